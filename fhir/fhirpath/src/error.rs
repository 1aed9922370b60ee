//! FHIRPath errors: syntax (lexing/parsing), semantic (compile-time checks such as unknown
//! functions or wrong argument counts) and execution (evaluation) errors.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Syntax,
    Semantic,
    Execution,
}

/// A FHIRPath error with a human-readable message and, when known, the byte offset in the
/// expression text where it was detected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub message: String,
    pub position: Option<usize>,
    pub kind: ErrorKind,
}

impl Error {
    pub fn syntax(message: impl Into<String>, position: usize) -> Self {
        Error {
            message: message.into(),
            position: Some(position),
            kind: ErrorKind::Syntax,
        }
    }
    pub fn semantic(message: impl Into<String>, position: Option<usize>) -> Self {
        Error {
            message: message.into(),
            position,
            kind: ErrorKind::Semantic,
        }
    }
    pub fn execution(message: impl Into<String>) -> Self {
        Error {
            message: message.into(),
            position: None,
            kind: ErrorKind::Execution,
        }
    }
    /// Sets the position when none is known yet.
    pub(crate) fn at(mut self, position: usize) -> Self {
        self.position.get_or_insert(position);
        self
    }
    /// Whether this is a parse-time (syntax or semantic) error rather than an evaluation error.
    pub fn is_parse_error(&self) -> bool {
        self.kind != ErrorKind::Execution
    }
    pub fn is_syntax(&self) -> bool {
        self.kind == ErrorKind::Syntax
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ErrorKind::Syntax => "FHIRPath syntax error",
            ErrorKind::Semantic => "FHIRPath semantic error",
            ErrorKind::Execution => "FHIRPath evaluation error",
        };
        match self.position {
            Some(p) => write!(f, "{kind} at offset {p}: {}", self.message),
            None => write!(f, "{kind}: {}", self.message),
        }
    }
}

impl std::error::Error for Error {}
