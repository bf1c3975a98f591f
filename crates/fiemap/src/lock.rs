//! Image locks compatible with qemu's, so that a file in use by qemu,
//! qemu-nbd or qemu-img is not read or written behind their back, and they
//! do not open a file sparsekit is writing.
//!
//! qemu's block/file-posix.c marks every image file it has open with OFD
//! byte-range locks (`F_OFD_SETLK`, always shared read locks, one byte
//! each): byte 100 + *n* for each [`Perm`] the user holds, byte 200 + *n*
//! for each permission it does not share with others. Before going on, an
//! opener tests (`F_OFD_GETLK`) that nobody else holds a byte 200 + *n* of
//! a permission it wants and nobody holds a byte 100 + *n* of one it does
//! not share. [`lock`] does the same with a [`Profile`]: the permissions
//! qemu-img takes in the situation the profile is named after.
//!
//! The locks belong to the open file description: they are held for as long
//! as the file (or a `dup`/`try_clone` of it) stays open, and go when it is
//! closed, whatever happens to the process. A reopen (`/proc/self/fd/N`, as
//! [`Uncached`](crate::Uncached) does) is a new description without them.
//!
//! ```
//! use sparsekit_fiemap::lock::{self, Locked, Profile};
//!
//! let dir = tempfile::tempdir()?;
//! let path = dir.path().join("disk.raw");
//! let dest = std::fs::File::options().read(true).write(true).create(true).open(&path)?;
//! // Lock before truncating: a file in use must not be changed at all.
//! assert_eq!(lock::lock(&dest, &path, Profile::WRITE)?, Locked::Held);
//! dest.set_len(1 << 20)?;
//!
//! // Another description (another process, or this one opening it again)
//! // is refused as qemu-img is.
//! let again = std::fs::File::open(&path)?;
//! let err = lock::lock(&again, &path, Profile::READ).unwrap_err();
//! assert!(err.to_string().contains("in use"), "{err}");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::fs::File;
use std::ops::BitOr;
use std::os::fd::AsFd;
use std::path::Path;

use nix::errno::Errno;

use crate::{Error, Result, sys};

/// First byte of the "holds permission *n*" locks (`RAW_LOCK_PERM_BASE`;
/// libvirt takes byte 0, qemu left room above it).
pub const PERM_BASE: u64 = 100;
/// First byte of the "does not share permission *n*" locks
/// (`RAW_LOCK_SHARED_BASE`).
pub const SHARED_BASE: u64 = 200;

/// A permission of qemu's block layer (`BLK_PERM_*` in
/// include/block/block-common.h); its bit number *n* is its lock byte's
/// offset from [`PERM_BASE`] and [`SHARED_BASE`].
///
/// qemu 6.1 and older also had graph-mod (bit 4, bytes 104 and 204);
/// qemu 6.2 removed it and neither takes nor tests those bytes, nor does
/// this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Perm {
    /// `BLK_PERM_CONSISTENT_READ`: what is read is a complete, consistent
    /// disk image.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE`: may change the visible disk contents.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED`: may write without changing the visible
    /// contents.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE`: may change the size.
    Resize = 3,
}

impl Perm {
    /// Every permission, in bit order (the order qemu takes and tests them).
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];

    /// The name qemu's messages use (`bdrv_perm_names` in block.c).
    pub fn name(self) -> &'static str {
        match self {
            Perm::ConsistentRead => "consistent read",
            Perm::Write => "write",
            Perm::WriteUnchanged => "write unchanged",
            Perm::Resize => "resize",
        }
    }

    const fn bit(self) -> u8 {
        1 << self as u8
    }
}

impl fmt::Display for Perm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of [`Perm`]s.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Perms(u8);

impl Perms {
    /// No permission.
    pub const NONE: Perms = Perms(0);

    /// The set of `perms`.
    pub const fn of(perms: &[Perm]) -> Perms {
        let mut bits = 0;
        let mut i = 0;
        while i < perms.len() {
            bits |= perms[i].bit();
            i += 1;
        }
        Perms(bits)
    }

    /// Whether `perm` is in the set.
    pub const fn contains(self, perm: Perm) -> bool {
        self.0 & perm.bit() != 0
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The permissions of the set, in bit order.
    pub fn iter(self) -> impl Iterator<Item = Perm> {
        Perm::ALL.into_iter().filter(move |&p| self.contains(p))
    }
}

impl From<Perm> for Perms {
    fn from(p: Perm) -> Self {
        Perms(p.bit())
    }
}

impl BitOr for Perms {
    type Output = Perms;
    fn bitor(self, rhs: Perms) -> Perms {
        Perms(self.0 | rhs.0)
    }
}

impl fmt::Debug for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(Perm::name)).finish()
    }
}

/// The permissions one user of an image holds and those it does not share.
///
/// The constants are what qemu 10 takes in the situation each is named
/// after, read from the lock bytes of running qemu-img, qemu-nbd and
/// qemu-io (crates/fiemap/tests/lock.rs checks each against them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Profile {
    /// Permissions held: bytes 100 + *n*.
    pub held: Perms,
    /// Permissions not shared with anyone else: bytes 200 + *n*.
    pub unshared: Perms,
}

const CR: Perm = Perm::ConsistentRead;

impl Profile {
    /// Reading an image that must not change underneath: `qemu-img
    /// convert`'s source (every layer of its chain, raw or qcow2, and an
    /// external data file), and `qemu-img map` or `check` of a qcow2
    /// image (each qcow2 layer). Refused while anyone writes or resizes.
    pub const READ: Profile = Profile {
        held: Perms::of(&[CR]),
        unshared: Perms::of(&[Perm::Write, Perm::Resize]),
    };

    /// Reading that lets others write: any read with `-U`/`--force-share`
    /// ([`Profile::READ`]`.force_share()`), and `qemu-img map` of a raw
    /// image, top or backing file (a raw image has no metadata that a
    /// writer could tear). Refused only by someone who does not share
    /// consistent reads (a qemu block job).
    pub const SHARED_READ: Profile = Profile {
        held: Perms::of(&[CR]),
        unshared: Perms::NONE,
    };

    /// Looking at a qcow2 image's metadata without reading its data:
    /// `qemu-img info`. Refused while anyone writes or resizes; with `-U`
    /// ([`Profile::force_share`]) qemu-img takes nothing at all. (qemu-img
    /// info of a raw image takes and tests nothing, with or without `-U`.)
    pub const INSPECT: Profile = Profile {
        held: Perms::NONE,
        unshared: Perms::of(&[Perm::Write, Perm::Resize]),
    };

    /// The external data file of a qcow2 image that `qemu-img map` reads:
    /// others may write it but not resize it.
    pub const DATA_FILE: Profile = Profile {
        held: Perms::of(&[CR]),
        unshared: Perms::of(&[Perm::Resize]),
    };

    /// Writing and resizing a destination nobody else may write or resize:
    /// what `qemu-img convert` holds on a qcow2 target, and qemu-nbd or
    /// qemu-io on a qcow2 image open for writing. Refused while anyone
    /// else holds or refuses write or resize, so a file that qemu-nbd
    /// serves, even read-only, is never written.
    ///
    /// qemu-img convert holds less on a raw target (consistent read and
    /// write, sharing everything), which lets a second writer or a
    /// qemu-nbd in meanwhile; a copy's destination is protected as a qcow2
    /// one is.
    pub const WRITE: Profile = Profile {
        held: Perms::of(&[CR, Perm::Write, Perm::Resize]),
        unshared: Perms::of(&[Perm::Write, Perm::Resize]),
    };

    /// The profile as `-U`/`--force-share` makes it: the same permissions
    /// held, none refused to others. qemu allows it only on images opened
    /// read-only.
    pub const fn force_share(self) -> Profile {
        Profile {
            held: self.held,
            unshared: Perms::NONE,
        }
    }

    /// Whether a user holding `self` and one holding `other` exclude each
    /// other: one holds a permission the other does not share.
    pub fn conflicts_with(self, other: Profile) -> bool {
        self.held.0 & other.unshared.0 != 0 || self.unshared.0 & other.held.0 != 0
    }

    /// The lock bytes of the profile, in the order qemu takes them.
    fn bytes(self) -> impl Iterator<Item = u64> {
        let held = self.held.iter().map(|p| PERM_BASE + p as u64);
        held.chain(self.unshared.iter().map(|p| SHARED_BASE + p as u64))
    }
}

/// Why another user's locks refuse a [`Profile`], in qemu's words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conflict {
    /// Someone does not share a permission the profile holds: qemu's
    /// `Failed to get "write" lock`.
    NotShared(Perm),
    /// Someone holds a permission the profile does not share: qemu's
    /// `Failed to get shared "write" lock`.
    Held(Perm),
    /// Someone holds an exclusive lock on this byte (no qemu does; another
    /// program might): qemu's `Failed to lock byte 100`.
    Byte(u64),
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::NotShared(p) => write!(f, "failed to get \"{p}\" lock"),
            Conflict::Held(p) => write!(f, "failed to get shared \"{p}\" lock"),
            Conflict::Byte(b) => write!(f, "failed to lock byte {b}"),
        }
    }
}

/// What [`lock`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Locked {
    /// The profile's locks are held by the file's open file description.
    Held,
    /// The kernel has no OFD locks (Linux before 3.15): nothing was taken
    /// or tested, and the caller goes on, as qemu does (its `locking=auto`
    /// default turns locking off when `F_OFD_GETLK` is EINVAL).
    NoOfdLocks,
}

/// Takes `profile`'s locks on `file` and tests that no other user's locks
/// refuse it, as qemu does when it opens an image (`raw_check_perm`):
/// first the locks, then the test, so that of two users opening at once
/// at least one sees the other. On a refusal, the locks this call took are
/// released and the error is [`Error::InUse`].
///
/// Call it once per open file description, right after opening and before
/// changing anything (for a destination: open without `O_TRUNC`, lock,
/// then truncate). The locks last as long as the description is open.
///
/// A file system whose locks fail (an NFSv3 mount without lockd answers
/// ENOLCK) is an [`Error::Lock`], as qemu refuses to open the image
/// (`Failed to lock byte 100: No locks available`).
pub fn lock(file: &File, path: &Path, profile: Profile) -> Result<Locked> {
    let fd = file.as_fd();
    let mut taken = Vec::with_capacity(8);
    let release = |taken: &[u64]| {
        for &b in taken {
            // Releasing cannot conflict; should it fail, closing the file
            // releases the byte anyway.
            let _ = sys::ofd_lock_byte(fd, b, false);
        }
    };
    for byte in profile.bytes() {
        match sys::ofd_lock_byte(fd, byte, true) {
            Ok(()) => taken.push(byte),
            // EINVAL: the kernel does not know F_OFD_SETLK at all.
            Err(Errno::EINVAL) if taken.is_empty() => return Ok(Locked::NoOfdLocks),
            Err(e) => {
                release(&taken);
                return Err(lock_error(path, byte, "F_OFD_SETLK", e));
            }
        }
    }
    if let Err(e) = test(file, path, profile) {
        release(&taken);
        return Err(e);
    }
    Ok(Locked::Held)
}

/// The tests of `raw_check_lock_bytes`, in its order: the "not shared"
/// byte of each permission held, then the "held" byte of each permission
/// not shared.
fn test(file: &File, path: &Path, profile: Profile) -> Result<()> {
    let checks = (profile
        .held
        .iter()
        .map(|p| (SHARED_BASE, p, Conflict::NotShared(p))))
    .chain(
        profile
            .unshared
            .iter()
            .map(|p| (PERM_BASE, p, Conflict::Held(p))),
    );
    for (base, perm, conflict) in checks {
        let byte = base + perm as u64;
        match sys::ofd_byte_locked_elsewhere(file.as_fd(), byte) {
            Ok(None) => {}
            Ok(Some(_)) => {
                return Err(Error::InUse {
                    path: path.to_owned(),
                    conflict,
                });
            }
            Err(e) => return Err(lock_error(path, byte, "F_OFD_GETLK", e)),
        }
    }
    Ok(())
}

fn lock_error(path: &Path, byte: u64, call: &'static str, e: Errno) -> Error {
    match e {
        Errno::EAGAIN | Errno::EACCES => Error::InUse {
            path: path.to_owned(),
            conflict: Conflict::Byte(byte),
        },
        e => Error::Lock {
            path: path.to_owned(),
            call,
            byte,
            source: e.into(),
        },
    }
}

/// Releases every lock byte of `profile` that `file`'s open file
/// description holds. Closing the last descriptor of the description does
/// the same; releasing first matters where the description may outlive
/// the close, as when another thread of the process forks and the child
/// holds a copy of the descriptor until it execs.
pub fn unlock(file: &File, profile: Profile) {
    for byte in profile.bytes() {
        // Releasing cannot conflict; should it fail, closing the file
        // releases the byte anyway.
        let _ = sys::ofd_lock_byte(file.as_fd(), byte, false);
    }
}

/// What the other open file descriptions of `file` hold together, read
/// from its lock bytes with `F_OFD_GETLK` (this description's own locks
/// are not seen). For messages and tests: which permissions a running qemu
/// holds and refuses.
pub fn held_elsewhere(file: &File, path: &Path) -> Result<Profile> {
    let mut held = Perms::NONE;
    let mut unshared = Perms::NONE;
    for perm in Perm::ALL {
        for (base, set) in [(PERM_BASE, &mut held), (SHARED_BASE, &mut unshared)] {
            let byte = base + perm as u64;
            match sys::ofd_byte_locked_elsewhere(file.as_fd(), byte) {
                Ok(None) => {}
                Ok(Some(_)) => *set = *set | perm.into(),
                Err(e) => return Err(lock_error(path, byte, "F_OFD_GETLK", e)),
            }
        }
    }
    Ok(Profile { held, unshared })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_descriptions() -> (tempfile::TempDir, std::path::PathBuf, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = File::open(&path).unwrap();
        let b = File::open(&path).unwrap();
        (dir, path, a, b)
    }

    #[test]
    fn bytes_are_qemus() {
        let bytes: Vec<u64> = Profile::WRITE.bytes().collect();
        assert_eq!(bytes, [100, 101, 103, 201, 203]);
        assert_eq!(Profile::READ.bytes().collect::<Vec<_>>(), [100, 201, 203]);
        assert_eq!(Profile::INSPECT.force_share().bytes().count(), 0);
        assert_eq!(Profile::READ.force_share(), Profile::SHARED_READ);
    }

    #[test]
    fn conflict_matrix() {
        use Profile as P;
        assert!(P::WRITE.conflicts_with(P::WRITE));
        assert!(P::WRITE.conflicts_with(P::READ));
        assert!(P::WRITE.conflicts_with(P::INSPECT));
        assert!(P::WRITE.conflicts_with(P::DATA_FILE));
        assert!(!P::WRITE.conflicts_with(P::SHARED_READ));
        assert!(!P::READ.conflicts_with(P::READ));
        assert!(!P::READ.conflicts_with(P::SHARED_READ));
        assert!(!P::INSPECT.conflicts_with(P::READ));
    }

    #[test]
    fn refusal_names_the_permission_as_qemu_does() {
        let (_dir, path, a, b) = two_descriptions();
        assert_eq!(lock(&a, &path, Profile::WRITE).unwrap(), Locked::Held);
        let e = lock(&b, &path, Profile::READ).unwrap_err();
        // READ holds consistent read (shared by WRITE), then tests that
        // nobody holds write: WRITE does.
        assert!(
            matches!(
                e,
                Error::InUse {
                    conflict: Conflict::Held(Perm::Write),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(
            e.to_string()
                .contains("failed to get shared \"write\" lock"),
            "{e}"
        );
        // A refused lock leaves nothing behind: b takes nothing, and once a
        // goes, b may write.
        assert_eq!(held_elsewhere(&a, &path).unwrap().held, Perms::NONE);
        drop(a);
        assert_eq!(lock(&b, &path, Profile::WRITE).unwrap(), Locked::Held);
    }

    #[test]
    fn a_reader_refuses_a_writer() {
        let (_dir, path, a, b) = two_descriptions();
        assert_eq!(lock(&a, &path, Profile::READ).unwrap(), Locked::Held);
        let e = lock(&b, &path, Profile::WRITE).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InUse {
                    conflict: Conflict::NotShared(Perm::Write),
                    ..
                }
            ),
            "{e:?}"
        );
        // Force-shared readers never refuse each other.
        assert_eq!(lock(&b, &path, Profile::SHARED_READ).unwrap(), Locked::Held);
    }

    #[test]
    fn held_elsewhere_reads_the_other_descriptions() {
        let (_dir, path, a, b) = two_descriptions();
        assert_eq!(lock(&a, &path, Profile::WRITE).unwrap(), Locked::Held);
        assert_eq!(held_elsewhere(&b, &path).unwrap(), Profile::WRITE);
        // Its own locks are not "elsewhere".
        assert_eq!(held_elsewhere(&a, &path).unwrap().held, Perms::NONE);
    }

    #[test]
    fn an_exclusive_lock_on_a_byte_is_a_conflict() {
        let (_dir, path, a, b) = two_descriptions();
        drop(a);
        let w = File::options().write(true).open(&path).unwrap();
        sys::ofd_write_lock_byte(w.as_fd(), 101).unwrap();
        let e = lock(&b, &path, Profile::WRITE).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InUse {
                    conflict: Conflict::Byte(101),
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("failed to lock byte 101"), "{e}");
        // Nothing of b's was left behind: a write lock on 100 is possible.
        sys::ofd_write_lock_byte(w.as_fd(), 100).unwrap();
    }

    #[test]
    fn a_failing_lock_call_is_an_error_naming_file_and_byte() {
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        // O_PATH descriptions cannot take locks: EBADF.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH)
            .open(&path)
            .unwrap();
        let e = lock(&f, &path, Profile::READ).unwrap_err();
        assert!(matches!(e, Error::Lock { byte: 100, .. }), "{e:?}");
        assert!(e.to_string().contains("byte 100"), "{e}");
    }

    #[test]
    fn unlocking_releases_the_profile_s_bytes() {
        let (_dir, path, a, b) = two_descriptions();
        assert_eq!(lock(&a, &path, Profile::WRITE).unwrap(), Locked::Held);
        assert!(lock(&b, &path, Profile::READ).is_err());
        unlock(&a, Profile::WRITE);
        let none = Profile {
            held: Perms::NONE,
            unshared: Perms::NONE,
        };
        assert_eq!(held_elsewhere(&b, &path).unwrap(), none);
        assert_eq!(lock(&b, &path, Profile::READ).unwrap(), Locked::Held);
    }
}
