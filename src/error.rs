//! Domain errors and the one place that turns them into gRPC statuses.
use tonic::{Code, Status};

use crate::os::OsError;
use crate::state::StateError;

/// Every error a handler or backend can return, named by what happened.
/// Which gRPC code a client sees is decided here, in one place
/// (`Error::code_in`), from the CSI spec's table of the RPC being answered:
/// the same "no space" is RESOURCE_EXHAUSTED for CreateVolume and
/// OUT_OF_RANGE for ControllerExpandVolume. The message (and the messages
/// of its sources) becomes the status message. Messages never carry
/// secrets: no handler puts a secret into one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed, names something that cannot be valid, or
    /// asks for something the volume or kind does not offer.
    #[error("{0}")]
    Invalid(String),
    /// The volume, snapshot, node or path the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The volume (or its kind) does not offer the capability asked for:
    /// its access type, access mode or filesystem type. The spec's
    /// "Exceeds capabilities" row, FAILED_PRECONDITION for NodeStageVolume
    /// and NodePublishVolume; INVALID_ARGUMENT elsewhere. (A mount flag
    /// Berth never passes is an invalid value for any volume: `Invalid`.)
    #[error("{0}")]
    Capability(String),
    /// The name or place is taken by something with other properties.
    #[error("{0}")]
    Conflict(String),
    /// The volume (or node) is not in a state that allows this now: in use,
    /// not staged, published elsewhere, formatted otherwise.
    #[error("{0}")]
    WrongState(String),
    /// The size asked for cannot be given: below what the data needs, above
    /// a limit, a shrink.
    #[error("{0}")]
    BadSize(String),
    /// Not enough room here: free bytes, free disks, project ids, volumes
    /// per node.
    #[error("{0}")]
    NoSpace(String),
    /// This node (or controller) cannot serve it and another one can: the
    /// topology names another node, the source lives on another node, the
    /// node cannot enforce what the class requires.
    #[error("{0}")]
    WrongNode(String),
    /// Another operation on the same volume or name is in progress.
    #[error("{0}")]
    Busy(String),
    /// The RPC or feature is not offered by the kinds served here.
    #[error("{0}")]
    Unsupported(String),
    /// A dependency (the NFS server, the state store after a failed flush)
    /// cannot be reached now; retrying later may succeed.
    #[error("{0}")]
    Unavailable(String),
    /// The call's operation did not end within the kind's deadline
    /// (`VolumeKind::op_deadline`): it goes on, holding its guards, and a
    /// retry meanwhile is ABORTED.
    #[error("{0}")]
    Deadline(String),
    /// The storage refuses what the request names, for a reason a retry
    /// of the same request cannot change: an NFS mount option the kernel
    /// does not accept, an export the server does not have.
    #[error("{context}")]
    Refused {
        context: String,
        #[source]
        source: OsError,
    },
    #[error("{context}")]
    Os {
        context: String,
        #[source]
        source: OsError,
    },
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("state store")]
    State(#[from] StateError),
    #[error("{0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn os(context: impl Into<String>, source: OsError) -> Self {
        Error::Os {
            context: context.into(),
            source,
        }
    }

    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The code of this error outside any particular RPC (logs, tests).
    pub fn code(&self) -> Code {
        self.code_in("")
    }

    /// The gRPC code that `rpc` (its CSI method name, as `rpc::serve`
    /// names it) answers this error with: the CSI spec's per-RPC table.
    /// The only rows that differ between RPCs:
    /// - a capability the volume does not offer ("Exceeds capabilities")
    ///   is FAILED_PRECONDITION for NodeStageVolume and NodePublishVolume,
    ///   INVALID_ARGUMENT for the expand RPCs' row and everywhere else;
    /// - ControllerExpandVolume and NodeExpandVolume list no
    ///   RESOURCE_EXHAUSTED: a size there is no room for is an
    ///   "unsupported capacity", OUT_OF_RANGE;
    /// - everywhere else no room, and "another node can", are
    ///   RESOURCE_EXHAUSTED (for CreateVolume that makes
    ///   external-provisioner let the scheduler pick again);
    /// - storage that refuses what a CreateVolume names (its share, its
    ///   mount options) is INVALID_ARGUMENT there: the request names
    ///   something that cannot work, and retrying it cannot help. For the
    ///   other RPCs the storage worked once (the volume exists) and the
    ///   refusal is INTERNAL.
    pub fn code_in(&self, rpc: &str) -> Code {
        let expand = matches!(rpc, "ControllerExpandVolume" | "NodeExpandVolume");
        match self {
            Error::Capability(_) if matches!(rpc, "NodeStageVolume" | "NodePublishVolume") => {
                Code::FailedPrecondition
            }
            Error::Invalid(_) | Error::Capability(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::Conflict(_) => Code::AlreadyExists,
            Error::WrongState(_) => Code::FailedPrecondition,
            Error::BadSize(_) => Code::OutOfRange,
            Error::NoSpace(_) if expand => Code::OutOfRange,
            Error::NoSpace(_) | Error::WrongNode(_) => Code::ResourceExhausted,
            // A filesystem out of blocks or inodes where a create or a
            // snapshot writes: no room, as the spec's tables say for them.
            Error::Os { source, .. }
                if matches!(rpc, "CreateVolume" | "CreateSnapshot")
                    && matches!(source.errno(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                Code::ResourceExhausted
            }
            Error::Refused { .. } if rpc == "CreateVolume" => Code::InvalidArgument,
            Error::Busy(_) => Code::Aborted,
            Error::Unsupported(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Deadline(_) => Code::DeadlineExceeded,
            Error::Os { source, .. } => match source {
                OsError::Timeout { .. } => Code::DeadlineExceeded,
                _ => Code::Internal,
            },
            Error::Refused { .. } | Error::Io { .. } | Error::State(_) | Error::Internal(_) => {
                Code::Internal
            }
        }
    }

    /// The status `rpc` answers with. Its message is cut to `MAX_MESSAGE`
    /// bytes: it travels in a header (`grpc-message`), and clients refuse
    /// header lists over 8 or 16 KiB, answering their own
    /// RESOURCE_EXHAUSTED or INTERNAL in place of the driver's error (an
    /// error naming many long paths came to 8.3 KB).
    pub fn status_in(&self, rpc: &str) -> Status {
        Status::new(self.code_in(rpc), bounded(self.render()))
    }

    /// The message with every source in the chain: "a: b: c".
    pub fn render(&self) -> String {
        chain(self)
    }
}

/// The most bytes of an error message an RPC answers with.
pub const MAX_MESSAGE: usize = 2048;

/// How many bytes of its end a message cut to `MAX_MESSAGE` keeps: what
/// happened (the errno of an OS error) comes last, after the paths.
const KEPT_TAIL: usize = 512;

/// `m` cut to at most `MAX_MESSAGE` bytes, on character boundaries: its
/// beginning and its last `KEPT_TAIL` bytes (an OS error's cause comes
/// after a path that may be long), with how much was cut between them.
fn bounded(m: String) -> String {
    if m.len() <= MAX_MESSAGE {
        return m;
    }
    let total = m.len();
    let mut head = MAX_MESSAGE - KEPT_TAIL - 64;
    while !m.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = total - KEPT_TAIL;
    while !m.is_char_boundary(tail) {
        tail += 1;
    }
    format!(
        "{} ... ({} bytes cut) ... {}",
        &m[..head],
        tail - head,
        &m[tail..]
    )
}

/// Any error's message with every source in its chain: "a: b: c" (the
/// errno of an OS error included: "write /x: No space left on device").
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        let m = e.to_string();
        if !m.is_empty() && !s.ends_with(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        src = e.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_chain() {
        let e = Error::os(
            "unmount of volume v1 failed",
            OsError::sys(
                "unmount",
                "/x",
                std::io::Error::from_raw_os_error(libc::EBUSY),
            ),
        );
        let st = e.status_in("NodeUnpublishVolume");
        assert_eq!(st.code(), Code::Internal);
        assert!(st
            .message()
            .starts_with("unmount of volume v1 failed: unmount /x: "));
        assert!(st.message().contains("busy"), "{}", st.message());
        let st = Error::NotFound("volume x not found".into()).status_in("DeleteSnapshot");
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(st.message(), "volume x not found");
        let full = Error::NoSpace("no room".into());
        assert_eq!(full.code_in("CreateVolume"), Code::ResourceExhausted);
        assert_eq!(full.code_in("CreateSnapshot"), Code::ResourceExhausted);
        assert_eq!(full.code_in("ControllerExpandVolume"), Code::OutOfRange);
        assert_eq!(full.code_in("NodeExpandVolume"), Code::OutOfRange);
        assert_eq!(
            Error::WrongNode("elsewhere".into()).code_in("CreateVolume"),
            Code::ResourceExhausted
        );
        let t = Error::os(
            "mkfs",
            OsError::Timeout {
                program: "mkfs".into(),
                secs: 1,
            },
        );
        assert_eq!(t.code(), Code::DeadlineExceeded);
    }

    /// A filesystem out of blocks or inodes (ENOSPC, EDQUOT from the OS)
    /// is no room for CreateVolume and CreateSnapshot (it was INTERNAL),
    /// and stays INTERNAL where the spec lists no such row.
    #[test]
    fn an_os_error_for_no_room_is_resource_exhausted_where_a_create_writes() {
        for errno in [libc::ENOSPC, libc::EDQUOT] {
            let e = Error::os(
                "creating /x",
                OsError::sys("mkdir", "/x", std::io::Error::from_raw_os_error(errno)),
            );
            assert_eq!(e.code_in("CreateVolume"), Code::ResourceExhausted);
            assert_eq!(e.code_in("CreateSnapshot"), Code::ResourceExhausted);
            assert_eq!(e.code_in("NodePublishVolume"), Code::Internal);
            assert_eq!(e.code_in("DeleteVolume"), Code::Internal);
        }
    }

    /// A capability the volume does not offer is the spec's "Exceeds
    /// capabilities": FAILED_PRECONDITION in the two node RPCs whose table
    /// says so, INVALID_ARGUMENT in the expand RPCs' and everywhere else.
    #[test]
    fn a_capability_the_volume_does_not_offer_follows_each_rpcs_table() {
        let e = Error::Capability("no raw block".into());
        for rpc in ["NodeStageVolume", "NodePublishVolume"] {
            assert_eq!(e.code_in(rpc), Code::FailedPrecondition, "{rpc}");
        }
        for rpc in [
            "CreateVolume",
            "ControllerPublishVolume",
            "ControllerExpandVolume",
            "NodeExpandVolume",
        ] {
            assert_eq!(e.code_in(rpc), Code::InvalidArgument, "{rpc}");
        }
    }

    /// Storage that refuses what a CreateVolume names is INVALID_ARGUMENT
    /// there, INTERNAL elsewhere (the volume's storage worked once).
    #[test]
    fn a_refusal_is_invalid_for_create_volume_only() {
        let e = Error::Refused {
            context: "mounting h:/x".into(),
            source: OsError::Failed {
                program: "mount.nfs".into(),
                status: "exit status: 32".into(),
                stderr: "mount.nfs: an incorrect mount option was specified".into(),
            },
        };
        assert_eq!(e.code_in("CreateVolume"), Code::InvalidArgument);
        assert_eq!(e.code_in("DeleteVolume"), Code::Internal);
        assert!(e
            .render()
            .ends_with("an incorrect mount option was specified"));
    }

    /// A message over `MAX_MESSAGE` bytes is cut on a character boundary
    /// and says how much was cut; a short one is kept whole.
    #[test]
    fn long_messages_are_cut() {
        let long = Error::Invalid(format!("paths: {}", "é/".repeat(3000)));
        let m = long.status_in("NodePublishVolume").message().to_string();
        assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
        assert!(m.starts_with("paths: é/"));
        assert!(m.contains(" bytes cut) ... "), "{m}");
        // The end, where an OS error's cause is, is kept.
        let os = Error::os(
            format!("mkdir /{}", "d/".repeat(3000)),
            crate::os::OsError::sys(
                "mkdir",
                std::path::Path::new("/d"),
                std::io::Error::from_raw_os_error(libc::ENAMETOOLONG),
            ),
        );
        let m = os.status_in("CreateSnapshot").message().to_string();
        assert!(m.len() <= MAX_MESSAGE, "{}", m.len());
        assert!(m.ends_with("File name too long (os error 36)"), "{m}");
        let short = Error::Invalid("short".into());
        assert_eq!(short.status_in("CreateVolume").message(), "short");
    }
}
