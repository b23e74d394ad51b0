//! Domain errors and the one place that turns them into gRPC statuses.
use std::error::Error as StdError;

use tonic::{Code, Status};

use crate::os::OsError;
use crate::state::StateError;

/// Every error a handler or backend can return. The variant picks the gRPC
/// code; the message (and the messages of its sources) becomes the status
/// message. Messages never carry secrets: no handler puts a secret into one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    OutOfRange(String),
    #[error("{0}")]
    ResourceExhausted(String),
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0}")]
    Unavailable(String),
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

    pub fn code(&self) -> Code {
        match self {
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::ResourceExhausted(_) => Code::ResourceExhausted,
            Error::Aborted(_) => Code::Aborted,
            Error::Unimplemented(_) => Code::Unimplemented,
            Error::Unavailable(_) => Code::Unavailable,
            Error::Os { source, .. } => match source {
                OsError::Timeout { .. } => Code::DeadlineExceeded,
                _ => Code::Internal,
            },
            Error::Io { .. } | Error::State(_) | Error::Internal(_) => Code::Internal,
        }
    }

    /// The message with every source in the chain: "a: b: c".
    pub fn render(&self) -> String {
        let mut s = self.to_string();
        let mut src = self.source();
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
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        Status::new(e.code(), e.render())
    }
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
        let st: Status = e.into();
        assert_eq!(st.code(), Code::Internal);
        assert!(st
            .message()
            .starts_with("unmount of volume v1 failed: unmount /x: "));
        assert!(st.message().contains("busy"), "{}", st.message());
        let st: Status = Error::NotFound("volume x not found".into()).into();
        assert_eq!(st.code(), Code::NotFound);
        assert_eq!(st.message(), "volume x not found");
        let t = Error::os(
            "mkfs",
            OsError::Timeout {
                program: "mkfs".into(),
                secs: 1,
            },
        );
        assert_eq!(t.code(), Code::DeadlineExceeded);
    }
}
