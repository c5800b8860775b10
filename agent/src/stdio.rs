//! Taking stdin/stdout for the gRPC wire.
//!
//! A stray write to fd 1 (from us, a library, or a child such as tailscaled) would corrupt HTTP/2
//! framing, and a child that inherits fd 1 would keep the pipe open after we die, so the controller
//! would never see EOF. So the wire moves to close-on-exec duplicates, fd 0 becomes /dev/null and
//! fd 1 becomes a copy of stderr. After that, anything written to "stdout" lands on stderr.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use nix::sys::stat::{SFlag, fstat};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;

/// The original stdin and stdout, moved to close-on-exec descriptors.
#[derive(Debug)]
pub struct Wire {
    /// Read end: the controller's requests.
    pub input: OwnedFd,
    /// Write end: our responses.
    pub output: OwnedFd,
}

/// Moves fds 0 and 1 out of the way; see the module docs.
pub fn take_stdio() -> io::Result<Wire> {
    // `try_clone_to_owned` uses F_DUPFD_CLOEXEC, so children never inherit the wire.
    let input = io::stdin().as_fd().try_clone_to_owned()?;
    #[allow(clippy::disallowed_methods)] // The one place that touches stdout: to take it away.
    let output = io::stdout().as_fd().try_clone_to_owned()?;
    let devnull = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(devnull.as_fd()).map_err(io::Error::from)?;
    nix::unistd::dup2_stdout(io::stderr().as_fd()).map_err(io::Error::from)?;
    Ok(Wire { input, output })
}

/// Boxed async halves of the wire.
pub type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
/// Boxed async halves of the wire.
pub type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// Turns the wire's descriptors into async streams. Pipes (what Modal and the local backend give
/// us) use tokio's epoll-driven pipe types; sockets are accepted too.
pub fn into_async(wire: Wire) -> io::Result<(BoxRead, BoxWrite)> {
    let reader: BoxRead = match kind(&wire.input)? {
        FdKind::Fifo => Box::new(pipe::Receiver::from_owned_fd(wire.input)?),
        FdKind::Socket => Box::new(socket(wire.input)?),
        FdKind::Other(what) => return Err(unsupported("stdin", what)),
    };
    let writer: BoxWrite = match kind(&wire.output)? {
        FdKind::Fifo => Box::new(pipe::Sender::from_owned_fd(wire.output)?),
        FdKind::Socket => Box::new(socket(wire.output)?),
        FdKind::Other(what) => return Err(unsupported("stdout", what)),
    };
    Ok((reader, writer))
}

enum FdKind {
    Fifo,
    Socket,
    Other(&'static str),
}

fn kind(fd: &OwnedFd) -> io::Result<FdKind> {
    let stat = fstat(fd.as_fd()).map_err(io::Error::from)?;
    let format = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    Ok(match format {
        SFlag::S_IFIFO => FdKind::Fifo,
        SFlag::S_IFSOCK => FdKind::Socket,
        SFlag::S_IFCHR => FdKind::Other("a character device (a terminal?)"),
        SFlag::S_IFREG => FdKind::Other("a regular file"),
        _ => FdKind::Other("neither a pipe nor a socket"),
    })
}

fn unsupported(which: &str, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{which} is {what}; the agent speaks gRPC on it and expects pipes or a socket from the tailbox controller"
        ),
    )
}

fn socket(fd: OwnedFd) -> io::Result<tokio::net::UnixStream> {
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    tokio::net::UnixStream::from_std(std)
}
