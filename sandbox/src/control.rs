//! The control channel between the host and a shim: a `SOCK_SEQPACKET` pair, one text
//! message per packet, so no framing is needed and a closed end reads as end-of-file.
//!
//! Host to shim: `launch` (carrying the container's stdin, stdout and stderr), `kill`,
//! `destroy`. Shim to host: `started <pid>`, `failed <reason>`, `exited code <n>`,
//! `exited signal <n>`, `destroyed`. The host closing its end means "destroy".

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// The longest control message.
const MAX_MESSAGE: usize = 4096;
/// The most descriptors one message carries: three stdio pipes, and a placed sandbox's two
/// `tasks` files per cgroup hierarchy (or its v2 cgroup) and its `pids.max`.
pub const MAX_FDS: usize = 64;
/// The most descriptors the kernel passes in one message (`SCM_MAX_FD`): room for them all,
/// so that none is ever cut off unread (and left open).
const KERNEL_MAX_FDS: usize = 253;

/// How init ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl std::fmt::Display for ExitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exit code {c}"),
            ExitKind::Signal(s) => write!(f, "signal {s}"),
        }
    }
}

/// A sandbox whose cgroup the host has made and limited. After the three stdio pipes the
/// launch carries the descriptors of its kind, then `pids.max` if there is a pids limit to
/// write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placed {
    /// Its v1 cgroups (see [`crate::placement`]): the sandbox's and the host's `tasks` file
    /// for each of `hierarchies`.
    Hierarchies {
        /// How many hierarchies (pairs of `tasks` descriptors).
        hierarchies: usize,
        /// The value for `pids.max`, if it is limited.
        pids: Option<String>,
    },
    /// Its v2 cgroup, for processes born there (see [`crate::born`]): the cgroup's directory.
    Born {
        /// The value for `pids.max`, if it is limited.
        pids: Option<String>,
    },
}

impl Placed {
    /// The value for `pids.max`, if it is limited.
    pub fn pids(&self) -> Option<&str> {
        match self {
            Placed::Hierarchies { pids, .. } | Placed::Born { pids } => pids.as_deref(),
        }
    }
}

/// One control message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Create and start the container; its cgroup is ready if `Some`.
    Launch(Option<Placed>),
    Kill,
    Destroy,
    Started(i32),
    Failed(String),
    Exited(ExitKind),
    /// The container is gone; `true`: its cgroup is removed too.
    Destroyed(bool),
}

impl Message {
    /// The wire form.
    pub fn encode(&self) -> String {
        match self {
            Message::Launch(None) => "launch".into(),
            Message::Launch(Some(placed)) => {
                let pids = placed.pids().unwrap_or("-");
                match placed {
                    Placed::Hierarchies { hierarchies, .. } => {
                        format!("launch placed {hierarchies} {pids}")
                    }
                    Placed::Born { .. } => format!("launch born {pids}"),
                }
            }
            Message::Kill => "kill".into(),
            Message::Destroy => "destroy".into(),
            Message::Started(pid) => format!("started {pid}"),
            Message::Failed(why) => format!("failed {why}"),
            Message::Exited(ExitKind::Code(c)) => format!("exited code {c}"),
            Message::Exited(ExitKind::Signal(s)) => format!("exited signal {s}"),
            Message::Destroyed(false) => "destroyed".into(),
            Message::Destroyed(true) => "destroyed clean".into(),
        }
    }

    /// Parses the wire form.
    pub fn decode(text: &str) -> Option<Message> {
        let (verb, rest) = text.split_once(' ').unwrap_or((text, ""));
        Some(match verb {
            "launch" if rest.is_empty() => Message::Launch(None),
            "launch" => {
                let fields: Vec<&str> = rest.split(' ').collect();
                let pids = |field: &str| (field != "-").then(|| field.to_string());
                Message::Launch(Some(match fields[..] {
                    ["placed", hierarchies, p] if !p.is_empty() => Placed::Hierarchies {
                        hierarchies: hierarchies.parse().ok()?,
                        pids: pids(p),
                    },
                    ["born", p] if !p.is_empty() => Placed::Born { pids: pids(p) },
                    _ => return None,
                }))
            }
            "kill" => Message::Kill,
            "destroy" => Message::Destroy,
            "destroyed" if rest.is_empty() => Message::Destroyed(false),
            "destroyed" if rest == "clean" => Message::Destroyed(true),
            "started" => Message::Started(rest.parse().ok()?),
            "failed" => Message::Failed(rest.to_string()),
            "exited" => {
                let (how, n) = rest.split_once(' ')?;
                let n = n.parse().ok()?;
                Message::Exited(match how {
                    "code" => ExitKind::Code(n),
                    "signal" => ExitKind::Signal(n),
                    _ => return None,
                })
            }
            _ => return None,
        })
    }
}

/// One end of a control channel.
#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
}

impl Channel {
    /// A connected pair (close-on-exec; the shim's end is given to it as stdin).
    pub fn pair() -> io::Result<(Channel, OwnedFd)> {
        let (a, b) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        Ok((Channel { fd: a }, b))
    }

    /// Wraps a descriptor that is one end of a control pair.
    pub fn from_fd(fd: OwnedFd) -> Channel {
        Channel { fd }
    }

    /// Sends a message, with descriptors attached.
    pub fn send_with_fds(&self, message: &Message, fds: &[RawFd]) -> io::Result<()> {
        let text = message.encode();
        let iov = [IoSlice::new(text.as_bytes())];
        let cmsg = [ControlMessage::ScmRights(fds)];
        let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
        sendmsg::<()>(
            self.fd.as_raw_fd(),
            &iov,
            cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(io::Error::from)?;
        Ok(())
    }

    /// Sends a message.
    pub fn send(&self, message: &Message) -> io::Result<()> {
        self.send_with_fds(message, &[])
    }

    /// Receives a message and any descriptors; `None` when the other end closed, or when
    /// `timeout` passed first (`Err` of kind `TimedOut`).
    pub fn recv(&self, timeout: Option<Duration>) -> io::Result<Option<(Message, Vec<OwnedFd>)>> {
        if let Some(timeout) = timeout {
            if !wait_readable(self.fd.as_fd(), timeout)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no control message in time",
                ));
            }
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let mut cmsg_space = nix::cmsg_space!([RawFd; KERNEL_MAX_FDS]);
        let (len, fds) = loop {
            let mut iov = [IoSliceMut::new(&mut buf)];
            match recvmsg::<()>(
                self.fd.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg_space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) {
                Ok(msg) => {
                    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a control message's descriptors were cut off",
                        ));
                    }
                    let mut fds = Vec::new();
                    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(received) = cmsg {
                            // SAFETY: SCM_RIGHTS descriptors are new in this process and ours.
                            fds.extend(
                                received
                                    .into_iter()
                                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                            );
                        }
                    }
                    if fds.len() > MAX_FDS {
                        // They close with `fds`.
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            format!("a control message carried more than {MAX_FDS} descriptors"),
                        ));
                    }
                    break (msg.bytes, fds);
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if len == 0 {
            return Ok(None);
        }
        let text = std::str::from_utf8(&buf[..len]).map_err(io::Error::other)?;
        let message = Message::decode(text).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown control message {text:?}"),
            )
        })?;
        Ok(Some((message, fds)))
    }

    /// The descriptor, for polling.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Waits until `fd` is readable (or closed); false if `timeout` passed first.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, poll_timeout(left)) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// A poll timeout for `left`, rounded up to whole milliseconds and capped.
pub fn poll_timeout(left: Duration) -> PollTimeout {
    let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128);
    PollTimeout::try_from(i32::try_from(ms).unwrap_or(i32::MAX)).unwrap_or(PollTimeout::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for m in [
            Message::Launch(None),
            Message::Launch(Some(Placed::Hierarchies {
                hierarchies: 9,
                pids: Some("64".into()),
            })),
            Message::Launch(Some(Placed::Hierarchies {
                hierarchies: 1,
                pids: None,
            })),
            Message::Launch(Some(Placed::Born {
                pids: Some("32".into()),
            })),
            Message::Launch(Some(Placed::Born { pids: None })),
            Message::Kill,
            Message::Destroy,
            Message::Destroyed(false),
            Message::Destroyed(true),
            Message::Started(42),
            Message::Failed("no such file".into()),
            Message::Exited(ExitKind::Code(3)),
            Message::Exited(ExitKind::Signal(9)),
        ] {
            assert_eq!(Message::decode(&m.encode()), Some(m));
        }
        assert_eq!(Message::decode("exited maybe 1"), None);
        assert_eq!(Message::decode("started x"), None);
        assert_eq!(Message::decode("launch placed"), None);
        assert_eq!(Message::decode("launch placed 2 64 extra"), None);
        assert_eq!(Message::decode("launch landed 2 64"), None);
        assert_eq!(Message::decode("launch born"), None);
        assert_eq!(Message::decode("launch born 64 extra"), None);
    }

    #[test]
    fn descriptors_cross_the_channel() {
        let (host, shim) = Channel::pair().unwrap();
        let shim = Channel::from_fd(shim);
        let (r, w) = nix::unistd::pipe().unwrap();
        host.send_with_fds(&Message::Launch(None), &[r.as_raw_fd(), w.as_raw_fd()])
            .unwrap();
        let (msg, fds) = shim.recv(Some(Duration::from_secs(1))).unwrap().unwrap();
        assert_eq!(msg, Message::Launch(None));
        assert_eq!(fds.len(), 2);
        // As many as a placed launch may carry, and no more.
        let many = vec![r.as_raw_fd(); MAX_FDS];
        host.send_with_fds(&Message::Destroy, &many).unwrap();
        let (_, fds) = shim.recv(Some(Duration::from_secs(1))).unwrap().unwrap();
        assert_eq!(fds.len(), MAX_FDS);
        let too_many = vec![r.as_raw_fd(); MAX_FDS + 1];
        host.send_with_fds(&Message::Destroy, &too_many).unwrap();
        let err = shim.recv(Some(Duration::from_secs(1))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        drop(host);
        assert!(shim.recv(Some(Duration::from_secs(1))).unwrap().is_none());
    }

    #[test]
    fn recv_times_out() {
        let (host, _shim) = Channel::pair().unwrap();
        let err = host.recv(Some(Duration::from_millis(10))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
