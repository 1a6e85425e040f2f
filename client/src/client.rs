//! A blocking client for the daemon's socket: connect, say hello, then one
//! request and one response per call.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::proto::{
    Change, CheckpointInfo, CheckpointRequest, Checkpoints, DiffReport, DiffRequest, ErrorBody, ErrorCode,
    ExportReport, ExportRequest, Hello, ListRequest, LogReport, LogRequest, MAX_LINE, PROTOCOL, Part, PlanInfo,
    PlanRef, PlanRollbackRequest, ProgressReport, PruneReport, PruneRequest, Request, Response, RevertRequest,
    RollbackReport, RollbackRequest, SandboxAdd, SandboxInfo, SandboxList, SandboxRemove, Sandboxes, ShowRequest,
    StatusReport, StatusRequest, UndoRequest, VerifyReport, VerifyRequest, WireBytes,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket.
    #[error("cannot reach snapbackd at {}: {source}", path.display())]
    Unreachable { path: PathBuf, source: io::Error },
    /// The daemon answered with an error.
    #[error("{}", .0.message)]
    Daemon(ErrorBody),
    /// The daemon said something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("talking to snapbackd: {0}")]
    Io(#[from] io::Error),
}

impl ClientError {
    /// Returns the daemon's error code, when the daemon refused.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Daemon(body) => Some(body.code),
            _ => None,
        }
    }
}

/// One piece of a streamed diff, in the order the daemon sends them.
#[derive(Debug, Clone, PartialEq)]
pub enum DiffItem {
    Change(Change),
    /// The next bytes of the patch.
    Patch(Vec<u8>),
}

/// Called with each progress line of a long request.
pub type ProgressFn = Box<dyn FnMut(&ProgressReport) + Send>;

/// How to connect. `Default` is a plain blocking connection.
#[derive(Default)]
pub struct ConnectOptions {
    /// Give up on a request whose answer (or next progress line) takes
    /// longer than this; `None` waits as long as the daemon works.
    pub timeout: Option<Duration>,
    /// Ask the daemon for progress lines and pass each one here.
    pub progress: Option<ProgressFn>,
}

/// A connection to snapbackd, past the hello exchange.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    daemon: String,
    progress: Option<ProgressFn>,
}

impl Client {
    /// Connects to the socket at `path` and exchanges hello / welcome.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        Self::connect_with(path, ConnectOptions::default())
    }

    /// Connects with `options`: a timeout, a progress callback.
    pub fn connect_with(path: &Path, options: ConnectOptions) -> Result<Client, ClientError> {
        let ConnectOptions { timeout, progress } = options;
        let stream =
            UnixStream::connect(path).map_err(|source| ClientError::Unreachable { path: path.to_owned(), source })?;
        stream.set_read_timeout(timeout)?;
        stream.set_write_timeout(timeout)?;
        let writer = stream.try_clone()?;
        let wants_progress = progress.is_some();
        let mut client = Client { reader: BufReader::new(stream), writer, daemon: String::new(), progress };
        let hello = Request::Hello(Hello {
            protocol: PROTOCOL,
            client: format!("snapback {}", env!("CARGO_PKG_VERSION")),
            progress: wants_progress,
        });
        match client.call(&hello)? {
            Response::Welcome(w) if w.protocol == PROTOCOL => client.daemon = w.daemon,
            Response::Welcome(w) => {
                return Err(ClientError::Protocol(format!(
                    "daemon speaks protocol {}, this client speaks {PROTOCOL}",
                    w.protocol
                )));
            }
            other => return Err(unexpected(other)),
        }
        Ok(client)
    }

    /// Returns the daemon's name and version from its welcome.
    pub fn daemon(&self) -> &str {
        &self.daemon
    }

    /// Sends one request and returns the daemon's answer, whole: an answer
    /// that came in parts (see [`Part`]) is put back together. An error
    /// answer is returned as `ClientError::Daemon`.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let mut parts = Vec::new();
        let answer = self.call_streaming(request, &mut |part| parts.push(part))?;
        Part::assemble(parts, answer).map_err(ClientError::Protocol)
    }

    /// Sends one request and hands each part of a long answer to `on_part`
    /// as it arrives (nothing of it is kept); returns the answer's last line,
    /// whose lists hold only what did not come in parts. For a client that
    /// prints, or counts, as it reads.
    pub fn call_streaming(
        &mut self,
        request: &Request,
        on_part: &mut dyn FnMut(Part),
    ) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        loop {
            let line = read_line(&mut self.reader)?;
            let response: Response = serde_json::from_slice(&line)
                .map_err(|e| ClientError::Protocol(format!("undecodable response: {e}")))?;
            match response {
                Response::Progress(report) => {
                    if let Some(f) = self.progress.as_mut() {
                        f(&report);
                    }
                }
                Response::Part(part) => on_part(part),
                Response::Error(body) => return Err(ClientError::Daemon(body)),
                other => return Ok(other),
            }
        }
    }

    /// A diff whose changes and patch pieces are handed to `on_item` in
    /// order as they arrive: a diff of any size in bounded memory. The
    /// report returned holds none of them, only the totals.
    pub fn diff_streaming(
        &mut self,
        req: DiffRequest,
        on_item: &mut dyn FnMut(DiffItem),
    ) -> Result<DiffReport, ClientError> {
        let mut bad = None;
        let mut on_part = |part: Part| {
            for item in part.items {
                let decoded = match part.field.as_str() {
                    "changes" => serde_json::from_value(item).map(DiffItem::Change),
                    "patch" => serde_json::from_value(item).map(|b: WireBytes| DiffItem::Patch(b.0)),
                    other => {
                        bad = Some(format!("a diff has no list {other:?}"));
                        continue;
                    }
                };
                match decoded {
                    Ok(item) => on_item(item),
                    Err(e) => bad = Some(format!("undecodable diff item: {e}")),
                }
            }
        };
        let answer = self.call_streaming(&Request::Diff(req), &mut on_part)?;
        if let Some(e) = bad {
            return Err(ClientError::Protocol(e));
        }
        match answer {
            Response::Diff(mut report) => {
                for change in std::mem::take(&mut report.changes) {
                    on_item(DiffItem::Change(change));
                }
                for piece in std::mem::take(&mut report.patch) {
                    on_item(DiffItem::Patch(piece.0));
                }
                Ok(report)
            }
            other => Err(unexpected(other)),
        }
    }

    /// Sends one request and returns its answer as the type that request
    /// answers with (a `Response` of another kind is a protocol error).
    /// Every request method below is this call.
    pub fn ask<T: Answer>(&mut self, request: Request) -> Result<T, ClientError> {
        T::from_response(self.call(&request)?).map_err(|other| unexpected(*other))
    }

    pub fn sandbox_add(&mut self, req: SandboxAdd) -> Result<SandboxInfo, ClientError> {
        self.ask(Request::SandboxAdd(req))
    }

    pub fn sandbox_list(&mut self) -> Result<Sandboxes, ClientError> {
        self.ask(Request::SandboxList(SandboxList {}))
    }

    pub fn sandbox_remove(&mut self, req: SandboxRemove) -> Result<SandboxInfo, ClientError> {
        self.ask(Request::SandboxRemove(req))
    }

    pub fn checkpoint(&mut self, req: CheckpointRequest) -> Result<CheckpointInfo, ClientError> {
        self.ask(Request::Checkpoint(req))
    }

    pub fn list(&mut self, req: ListRequest) -> Result<Checkpoints, ClientError> {
        self.ask(Request::List(req))
    }

    pub fn show(&mut self, checkpoint: &str) -> Result<CheckpointInfo, ClientError> {
        self.ask(Request::Show(ShowRequest { checkpoint: checkpoint.to_owned() }))
    }

    pub fn diff(&mut self, req: DiffRequest) -> Result<DiffReport, ClientError> {
        self.ask(Request::Diff(req))
    }

    pub fn rollback(&mut self, req: RollbackRequest) -> Result<RollbackReport, ClientError> {
        self.ask(Request::Rollback(req))
    }

    pub fn plan_show(&mut self, plan: &str) -> Result<PlanInfo, ClientError> {
        self.ask(Request::PlanShow(PlanRef { plan: plan.to_owned() }))
    }

    /// Marks a plan applied: from then on it can no longer be rolled back.
    pub fn plan_apply(&mut self, plan: &str) -> Result<PlanInfo, ClientError> {
        self.ask(Request::PlanApply(PlanRef { plan: plan.to_owned() }))
    }

    pub fn plan_abandon(&mut self, plan: &str) -> Result<PlanInfo, ClientError> {
        self.ask(Request::PlanAbandon(PlanRef { plan: plan.to_owned() }))
    }

    pub fn plan_rollback(&mut self, req: PlanRollbackRequest) -> Result<RollbackReport, ClientError> {
        self.ask(Request::PlanRollback(req))
    }

    pub fn revert(&mut self, req: RevertRequest) -> Result<RollbackReport, ClientError> {
        self.ask(Request::Revert(req))
    }

    pub fn undo(&mut self, req: UndoRequest) -> Result<RollbackReport, ClientError> {
        self.ask(Request::Undo(req))
    }

    /// The timeline of checkpoints, newest first.
    pub fn log(&mut self, req: LogRequest) -> Result<LogReport, ClientError> {
        self.ask(Request::Log(req))
    }

    pub fn prune(&mut self, req: PruneRequest) -> Result<PruneReport, ClientError> {
        self.ask(Request::Prune(req))
    }

    pub fn export(&mut self, req: ExportRequest) -> Result<ExportReport, ClientError> {
        self.ask(Request::Export(req))
    }

    pub fn verify(&mut self) -> Result<VerifyReport, ClientError> {
        self.ask(Request::Verify(VerifyRequest {}))
    }

    pub fn status(&mut self) -> Result<StatusReport, ClientError> {
        self.ask(Request::Status(StatusRequest {}))
    }
}

/// An answer's payload: what one kind of [`Response`] carries.
pub trait Answer: Sized {
    /// The payload of `response`, or `response` itself when it is of
    /// another kind.
    fn from_response(response: Response) -> Result<Self, Box<Response>>;
}

macro_rules! answers {
    ($($payload:ty => $variant:ident),+ $(,)?) => {
        $(impl Answer for $payload {
            fn from_response(response: Response) -> Result<Self, Box<Response>> {
                match response {
                    Response::$variant(payload) => Ok(payload),
                    other => Err(Box::new(other)),
                }
            }
        })+
    };
}

// Each payload and the one kind of answer that carries it.
answers! {
    SandboxInfo => Sandbox, Sandboxes => Sandboxes, CheckpointInfo => Checkpoint, Checkpoints => Checkpoints,
    DiffReport => Diff, LogReport => Log, RollbackReport => Rollback, StatusReport => Status, PlanInfo => Plan,
    PruneReport => Pruned, ExportReport => Exported, VerifyReport => Verified,
}

fn unexpected(response: Response) -> ClientError {
    ClientError::Protocol(format!("unexpected response: {response:?}"))
}

/// Reads one newline-terminated line of at most `MAX_LINE` bytes.
fn read_line(reader: &mut impl BufRead) -> Result<Vec<u8>, ClientError> {
    let mut line = Vec::new();
    let n = reader.by_ref().take(MAX_LINE as u64).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(ClientError::Protocol("the daemon closed the connection".into()));
    }
    if line.last() != Some(&b'\n') {
        return Err(ClientError::Protocol(if n >= MAX_LINE {
            format!("response longer than {MAX_LINE} bytes")
        } else {
            "the daemon closed the connection mid-line".into()
        }));
    }
    line.pop();
    Ok(line)
}
