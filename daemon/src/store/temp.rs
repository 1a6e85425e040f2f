//! A temporary file in one of the store's directories: removed when
//! dropped, unless it was persisted under its final name. Every object,
//! probe and marker the store writes goes through one, so no error path
//! leaves a temporary behind.

use super::*;

pub(super) struct Temp<'a> {
    dir: BorrowedFd<'a>,
    name: Vec<u8>,
    pub(super) fd: OwnedFd,
    kept: bool,
}

impl<'a> Temp<'a> {
    /// Creates `name` in `dir` (which must not exist yet) with `mode`.
    pub(super) fn create(dir: BorrowedFd<'a>, name: Vec<u8>, mode: u32) -> io::Result<Temp<'a>> {
        let fd = sys::openat(dir, &name, libc::O_CREAT | libc::O_EXCL | libc::O_RDWR, mode)?;
        Ok(Temp { dir, name, fd, kept: false })
    }

    /// Keeps it under the name it was made with.
    pub(super) fn keep(mut self) {
        self.kept = true;
    }

    /// Renames it to `to` in the same directory. With `noreplace`, a name
    /// already there is kept and the temporary removed; returns whether
    /// the temporary took the name.
    pub(super) fn persist(mut self, to: &[u8], noreplace: bool) -> io::Result<bool> {
        match sys::renameat(self.dir, &self.name, self.dir, to, noreplace) {
            Ok(()) => {
                self.kept = true;
                Ok(true)
            }
            Err(e) if noreplace && e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Temp<'_> {
    fn drop(&mut self) {
        if !self.kept {
            let _ = sys::unlinkat(self.dir, &self.name, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_temporary_is_gone_unless_persisted() {
        let t = tempfile::tempdir().unwrap();
        let dir: OwnedFd = std::fs::File::open(t.path()).unwrap().into();
        let names = || sys::read_dir(dir.as_fd()).unwrap().into_iter().map(|e| e.name).collect::<Vec<_>>();
        drop(Temp::create(dir.as_fd(), b"dropped".to_vec(), 0o600).unwrap());
        assert!(names().is_empty());
        let kept = Temp::create(dir.as_fd(), b"kept.tmp".to_vec(), 0o600).unwrap();
        assert!(kept.persist(b"kept", true).unwrap());
        assert_eq!(names(), [b"kept".to_vec()]);
        // A name already there is kept; the temporary goes.
        let late = Temp::create(dir.as_fd(), b"late.tmp".to_vec(), 0o600).unwrap();
        assert!(!late.persist(b"kept", true).unwrap());
        assert_eq!(names(), [b"kept".to_vec()]);
    }
}
