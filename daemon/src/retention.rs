//! Retention: which checkpoints a sandbox keeps.
//!
//! A policy applies to every sandbox after every checkpoint, without being
//! asked for. It keeps the newest `keep_last` checkpoints; of older ones,
//! the newest of each hour for the last `keep_hourly` hours and the newest
//! of each day for the last `keep_daily` days; and always the pinned ones,
//! the newest one, and the safety checkpoint of the latest rollback. A
//! storage budget, when set, then prunes the oldest prunable checkpoints
//! until the sandbox's exclusive bytes fit.

use std::collections::HashSet;

use serde::Deserialize;

/// A retention policy. The defaults are the daemon's defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub keep_last: u64,
    pub keep_hourly: u64,
    pub keep_daily: u64,
    /// Also keep everything younger than this (a `prune --keep-within`).
    pub keep_within_ms: Option<i64>,
    /// Prune oldest-first while the sandbox's exclusive bytes exceed this.
    pub budget_bytes: Option<u64>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { keep_last: 100, keep_hourly: 24, keep_daily: 7, keep_within_ms: None, budget_bytes: None }
    }
}

/// Retention settings as written in the configuration file; absent keys
/// fall back to the level above (sandbox, then `[retention]`, then the
/// built-in default).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub keep_last: Option<u64>,
    pub keep_hourly: Option<u64>,
    pub keep_daily: Option<u64>,
    /// 0 means no budget.
    pub budget_bytes: Option<u64>,
}

impl Policy {
    /// Returns this policy with `settings` applied over it.
    pub fn with(&self, settings: &Settings) -> Policy {
        Policy {
            keep_last: settings.keep_last.unwrap_or(self.keep_last),
            keep_hourly: settings.keep_hourly.unwrap_or(self.keep_hourly),
            keep_daily: settings.keep_daily.unwrap_or(self.keep_daily),
            keep_within_ms: self.keep_within_ms,
            budget_bytes: match settings.budget_bytes {
                Some(0) => None,
                Some(b) => Some(b),
                None => self.budget_bytes,
            },
        }
    }
}

/// What retention needs to know of a checkpoint.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub id: String,
    pub seq: u64,
    pub created_ms: i64,
    pub pinned: bool,
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// Returns the ids of the checkpoints that `policy` keeps (its budget
/// aside), of `candidates` sorted by seq ascending. `protected` ids are
/// always kept.
pub fn kept(candidates: &[Candidate], policy: &Policy, now_ms: i64, protected: &HashSet<String>) -> HashSet<String> {
    let mut keep = HashSet::new();
    let n = candidates.len();
    for c in candidates.iter().skip(n.saturating_sub(policy.keep_last.max(1) as usize)) {
        keep.insert(c.id.clone());
    }
    for c in candidates {
        if c.pinned || protected.contains(&c.id) || policy.keep_within_ms.is_some_and(|w| c.created_ms >= now_ms - w) {
            keep.insert(c.id.clone());
        }
    }
    for (span, count) in [(HOUR_MS, policy.keep_hourly), (DAY_MS, policy.keep_daily)] {
        let since = now_ms - span * count as i64;
        let mut last_bucket = None;
        // Newest first: the first checkpoint met in each bucket is its newest.
        for c in candidates.iter().rev().filter(|c| c.created_ms >= since) {
            let bucket = c.created_ms.div_euclid(span);
            if last_bucket != Some(bucket) {
                keep.insert(c.id.clone());
                last_bucket = Some(bucket);
            }
        }
    }
    keep
}

/// Returns whether a checkpoint may be pruned at all (by policy or budget).
pub fn prunable(c: &Candidate, newest_seq: u64, protected: &HashSet<String>) -> bool {
    !c.pinned && c.seq != newest_seq && !protected.contains(&c.id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(i: u64, created_ms: i64) -> Candidate {
        Candidate { id: format!("c{i}"), seq: i, created_ms, pinned: false }
    }

    #[test]
    fn a_thousand_checkpoints_a_day_keep_about_130() {
        let now = 1_000 * DAY_MS;
        // One every 86.4 s over the last day, plus six older days' worth.
        let all: Vec<Candidate> = (0..7_000).map(|i| at(i, now - (7_000 - i as i64) * 86_400)).collect();
        let keep = kept(&all, &Policy::default(), now, &HashSet::new());
        assert!((120..=135).contains(&keep.len()), "kept {}", keep.len());
        assert!(keep.contains("c6999"), "the newest is kept");
    }

    #[test]
    fn pinned_protected_and_newest_survive_any_policy() {
        let now = 100 * DAY_MS;
        let mut all: Vec<Candidate> = (0..10).map(|i| at(i, now - 30 * DAY_MS + i as i64)).collect();
        all[2].pinned = true;
        let policy = Policy { keep_last: 1, keep_hourly: 0, keep_daily: 0, ..Policy::default() };
        let protected = HashSet::from(["c5".to_string()]);
        let keep = kept(&all, &policy, now, &protected);
        let mut ids: Vec<_> = keep.into_iter().collect();
        ids.sort();
        assert_eq!(ids, ["c2", "c5", "c9"]);
        assert!(!prunable(&all[9], 9, &protected));
        assert!(!prunable(&all[2], 9, &protected));
        assert!(prunable(&all[3], 9, &protected));
    }

    #[test]
    fn keep_within_keeps_everything_young() {
        let now = 10 * DAY_MS;
        let all: Vec<Candidate> = (0..50).map(|i| at(i, now - 50_000 + i as i64 * 1000)).collect();
        let policy =
            Policy { keep_last: 1, keep_hourly: 0, keep_daily: 0, keep_within_ms: Some(20_000), ..Policy::default() };
        assert_eq!(kept(&all, &policy, now, &HashSet::new()).len(), 20);
    }

    #[test]
    fn settings_override_level_by_level() {
        let base =
            Policy::default().with(&Settings { keep_last: Some(5), budget_bytes: Some(10), ..Settings::default() });
        assert_eq!((base.keep_last, base.keep_hourly, base.budget_bytes), (5, 24, Some(10)));
        let off = base.with(&Settings { budget_bytes: Some(0), ..Settings::default() });
        assert_eq!(off.budget_bytes, None);
    }
}
