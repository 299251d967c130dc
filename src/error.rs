//! Typed errors for the places where a caller may want to react: no GPU, a shape or dtype
//! mismatch, a CUDA failure. The binary wraps them in `anyhow` at its edge.

use std::fmt;

/// The crate's error type: every fallible function in emprior returns [`Result`] with it.
///
/// `Display` gives a one-line message (`"{op}: {what} has shape ..."`), suitable for a CLI.
#[derive(Debug)]
pub enum Error {
    /// No usable GPU; the string says why (no driver, no device, no kernels in this build...).
    GpuUnavailable(String),
    /// An operand's shape does not fit the operation.
    Shape {
        /// The operation that rejected the operand, e.g. `"gemm"`.
        op: &'static str,
        /// Which operand (or dimension) is wrong, e.g. `"b"`.
        what: String,
        /// The shape the operation needed, `Debug`-formatted.
        expected: String,
        /// The shape it got, `Debug`-formatted.
        actual: String,
    },
    /// An operand's dtype is not supported by the operation.
    DType {
        /// The operation that rejected the operand.
        op: &'static str,
        /// The dtype(s) it accepts, in words (e.g. `"f32 or f64"`).
        expected: &'static str,
        /// The name of the dtype it got (see `DType::name`).
        actual: &'static str,
    },
    /// Operands live on different devices.
    DeviceMismatch {
        /// The operation whose operands disagree.
        op: &'static str,
        /// Which operands sit where, in words.
        detail: String,
    },
    /// A CUDA driver call or kernel launch failed.
    Cuda {
        /// What was being done: the driver call, kernel or module name.
        context: String,
        /// The driver's error, `Debug`-formatted.
        message: String,
    },
    /// Anything else, with its message.
    Other(String),
}

/// `std::result::Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::GpuUnavailable(reason) => write!(f, "GPU unavailable: {reason}"),
            Error::Shape {
                op,
                what,
                expected,
                actual,
            } => write!(f, "{op}: {what} has shape {actual}, expected {expected}"),
            Error::DType { op, expected, actual } => {
                write!(f, "{op}: dtype {actual} is not supported (expected {expected})")
            }
            Error::DeviceMismatch { op, detail } => {
                write!(f, "{op}: operands on different devices ({detail})")
            }
            Error::Cuda { context, message } => write!(f, "CUDA error in {context}: {message}"),
            Error::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for Error {}

impl Error {
    pub(crate) fn cuda(context: impl Into<String>, err: impl fmt::Debug) -> Self {
        Error::Cuda {
            context: context.into(),
            message: format!("{err:?}"),
        }
    }

    pub(crate) fn shape(
        op: &'static str,
        what: impl Into<String>,
        expected: impl fmt::Debug,
        actual: impl fmt::Debug,
    ) -> Self {
        Error::Shape {
            op,
            what: what.into(),
            expected: format!("{expected:?}"),
            actual: format!("{actual:?}"),
        }
    }
}
