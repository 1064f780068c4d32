//! Moving a device's socket from the shard that accepted it to the shard that owns the
//! device.
//!
//! A glommio `TcpStream` is bound to its executor's reactor and is not `Send`, and
//! glommio 0.9 cannot give its descriptor up. So the accepting shard duplicates the
//! descriptor (`F_DUPFD_CLOEXEC`), drops its stream (which closes only its own
//! descriptor and cancels its pending poll), and sends the duplicate, an owned
//! [`OwnedFd`], to the owner, which wraps it in a stream registered with its own reactor.
//!
//! This is the one place that needs `unsafe`: taking the raw descriptor of a live stream
//! and building a stream from a descriptor are `unsafe` in std and glommio. Each block
//! says why it holds.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd};

use glommio::net::TcpStream;

/// Takes the socket out of `stream`: a duplicate descriptor that owns the connection
/// once `stream` is dropped.
///
/// # Errors
/// When the descriptor cannot be duplicated (e.g. the open-files limit); `stream` is
/// dropped either way.
pub(crate) fn detach(stream: TcpStream) -> io::Result<OwnedFd> {
    // SAFETY: `stream` is alive for the whole borrow, so its descriptor is open and valid;
    // the borrow ends before `stream` is dropped below.
    let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let owned = borrowed.try_clone_to_owned();
    drop(stream);
    owned
}

/// Builds a stream on the current shard's reactor from a descriptor made by [`detach`].
///
/// # Panics
/// Outside a glommio executor (glommio's own rule).
pub(crate) fn attach(fd: OwnedFd) -> TcpStream {
    // SAFETY: `fd` is an owned, open descriptor of a connected TCP socket (made by
    // `detach`); `into_raw_fd` gives its ownership up, and the stream takes it over
    // exactly once.
    unsafe { TcpStream::from_raw_fd(fd.into_raw_fd()) }
}
