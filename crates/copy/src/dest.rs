//! Destinations: what DEST is, learned without writing anything.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sparsekit_fiemap::lock::{self, Profile};

use crate::endpoint::{FileId, Spec};
use crate::error::OpenError;
use crate::nbd::NbdSource;

/// Regular file, block device or NBD export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DestKind {
    /// A regular file.
    Regular,
    /// A block device.
    BlockDevice,
    /// An NBD export.
    Nbd,
}

/// How a destination is reached, where that is not a local path's
/// business: the NBD connections.
#[derive(Clone, Debug)]
pub struct DestOptions {
    /// NBD: give up on a server that does not answer for this long
    /// (`None`: wait forever).
    pub timeout: Option<std::time::Duration>,
    /// NBD: connections to write through, where the server advertises
    /// multi-conn (one otherwise); see [`crate::plan::nbd_connections`].
    pub connections: usize,
    /// NBD over TLS: the folder of `ca-cert.pem` (and `client-cert.pem`,
    /// `client-key.pem`) where the URI does not name one.
    pub tls_certificates: Option<PathBuf>,
}

impl Default for DestOptions {
    fn default() -> Self {
        Self {
            timeout: sparsekit_nbd::ClientConfig::default().timeout,
            connections: crate::plan::NBD_CONNECTIONS,
            tls_certificates: None,
        }
    }
}

/// An existing local destination, open read-write (nothing written).
#[derive(Debug)]
pub(crate) struct OpenedDest {
    pub(crate) file: File,
    pub(crate) kind: DestKind,
    pub(crate) size: u64,
    pub(crate) id: FileId,
    /// qemu's write locks, once the plan has taken them.
    pub(crate) lock: Option<WriteLock>,
}

/// qemu's write locks on a destination ([`Profile::WRITE`]), held by the
/// destination's open file description and released when dropped.
#[derive(Debug)]
pub(crate) struct WriteLock(File);

impl WriteLock {
    /// Takes the locks on `file`'s description; refused when someone else
    /// has the file open in a way that excludes writing it.
    pub(crate) fn take(file: &File, path: &Path) -> Result<Self, sparsekit_fiemap::Error> {
        let dup = file
            .try_clone()
            .map_err(|source| sparsekit_fiemap::Error::Open {
                path: path.to_owned(),
                what: "duplicating the descriptor to lock",
                source,
            })?;
        lock::lock(&dup, path, Profile::WRITE).map(drop)?;
        Ok(Self(dup))
    }
}

/// Creates the new destination `path` (O_EXCL: a file that appeared since
/// inspection was not checked, and is not ours to truncate), readable too
/// (qemu's locks are read locks), and takes its write locks before
/// anything is written; a file that cannot be locked is removed again.
pub(crate) fn create_locked(path: &Path) -> Result<(File, WriteLock), crate::error::Error> {
    use crate::error::Error;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| Error::OpenDest {
            path: path.to_owned(),
            what: "creating",
            source,
        })?;
    match WriteLock::take(&file, path) {
        Ok(lock) => Ok((file, lock)),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(Error::Locked(e))
        }
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        // Released before the descriptors close: a child forked by another
        // thread may hold a copy of them until it execs.
        lock::unlock(&self.0, Profile::WRITE);
    }
}

/// A local destination: its path, and the open file when it exists.
#[derive(Debug)]
pub(crate) struct LocalDest {
    pub(crate) path: PathBuf,
    pub(crate) existing: Option<OpenedDest>,
}

/// A destination taken apart for writing.
#[derive(Debug)]
pub(crate) enum DestTarget {
    Local(LocalDest),
    Stdout,
    Nbd(Box<NbdSource>),
}

#[derive(Debug)]
enum Target {
    Local(LocalDest),
    Stdout,
    Nbd(Box<NbdSource>),
}

/// A destination, inspected: its kind, size and identity, and for an
/// existing file or device the descriptor the copy will write through
/// (opened read-write, never truncated or written here). Only executing a
/// [`crate::Plan`] creates, truncates or writes it.
#[derive(Debug)]
pub struct Destination {
    name: String,
    target: Target,
}

impl Destination {
    /// Inspects `spec` with the default [`DestOptions`]: see
    /// [`Destination::open`].
    pub fn inspect(spec: &Spec) -> Result<Self, OpenError> {
        Self::open(spec, &DestOptions::default())
    }

    /// Inspects `spec`: standard output for `-`; for a path, an existing
    /// regular file or block device is opened read-write (a block device
    /// with O_EXCL, so that one mounted or in use is refused), anything
    /// else is refused, and for a path that does not exist its folder must
    /// be there to hold it; an NBD URI is connected to (its handshake says
    /// its size and whether it can be written; nothing is written).
    pub fn open(spec: &Spec, opts: &DestOptions) -> Result<Self, OpenError> {
        let path = match spec {
            Spec::Stdio => {
                return Ok(Self {
                    name: "standard output".into(),
                    target: Target::Stdout,
                });
            }
            Spec::Nbd(uri) => {
                let config = sparsekit_nbd::ClientConfig {
                    timeout: opts.timeout,
                    tls_certificates: opts.tls_certificates.clone(),
                    ..Default::default()
                };
                let export = NbdSource::connect_for_writing(uri, opts.connections, &config)?;
                return Ok(Self {
                    name: uri.to_string(),
                    target: Target::Nbd(Box::new(export)),
                });
            }
            Spec::Path(p) => p,
        };
        let existing = match std::fs::metadata(path) {
            Ok(m) => Some(open_existing(path, &m)?),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                check_folder(path)?;
                None
            }
            Err(source) => {
                return Err(OpenError::Io {
                    path: path.clone(),
                    what: "examining",
                    source,
                });
            }
        };
        Ok(Self {
            name: path.display().to_string(),
            target: Target::Local(LocalDest {
                path: path.clone(),
                existing,
            }),
        })
    }

    /// The file, device or `standard output`, for messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The path of a local destination.
    pub fn path(&self) -> Option<&Path> {
        match &self.target {
            Target::Local(l) => Some(&l.path),
            Target::Stdout | Target::Nbd(_) => None,
        }
    }

    /// The export of an NBD destination.
    pub fn nbd(&self) -> Option<&NbdSource> {
        match &self.target {
            Target::Nbd(n) => Some(n),
            _ => None,
        }
    }

    /// True for standard output.
    pub fn is_stdout(&self) -> bool {
        matches!(self.target, Target::Stdout)
    }

    /// Kind of an existing destination (`None`: standard output, or a
    /// file the copy will create).
    pub fn kind(&self) -> Option<DestKind> {
        match &self.target {
            Target::Nbd(_) => Some(DestKind::Nbd),
            _ => self.existing().map(|e| e.kind),
        }
    }

    /// Size in bytes of an existing destination.
    pub fn size(&self) -> Option<u64> {
        match &self.target {
            Target::Nbd(n) => Some(crate::source::Source::size(n.as_ref())),
            _ => self.existing().map(|e| e.size),
        }
    }

    /// Identity of an existing local destination.
    pub fn id(&self) -> Option<FileId> {
        self.existing().map(|e| e.id)
    }

    fn existing(&self) -> Option<&OpenedDest> {
        match &self.target {
            Target::Local(l) => l.existing.as_ref(),
            Target::Stdout | Target::Nbd(_) => None,
        }
    }

    /// Takes qemu's write locks on an existing local destination: nobody
    /// else may write or resize it while the copy holds it open, and one
    /// that qemu, qemu-nbd or qemu-img has open is refused.
    pub(crate) fn lock(&mut self) -> Result<(), sparsekit_fiemap::Error> {
        if let Target::Local(LocalDest {
            path,
            existing: Some(e),
        }) = &mut self.target
        {
            e.lock = Some(WriteLock::take(&e.file, path)?);
        }
        Ok(())
    }

    /// The local destination, for the sink; `None` for standard output.
    pub(crate) fn into_local(self) -> Option<LocalDest> {
        match self.target {
            Target::Local(l) => Some(l),
            Target::Stdout | Target::Nbd(_) => None,
        }
    }

    /// What the sink writes through.
    pub(crate) fn into_target(self) -> DestTarget {
        match self.target {
            Target::Local(l) => DestTarget::Local(l),
            Target::Stdout => DestTarget::Stdout,
            Target::Nbd(n) => DestTarget::Nbd(n),
        }
    }
}

fn open_existing(path: &Path, meta: &std::fs::Metadata) -> Result<OpenedDest, OpenError> {
    let t = meta.file_type();
    if !(t.is_file() || t.is_block_device()) {
        return Err(OpenError::DestNotWritable {
            path: path.to_owned(),
            kind: if t.is_dir() {
                "directory"
            } else if t.is_fifo() {
                "FIFO"
            } else if t.is_char_device() {
                "character device"
            } else {
                "special file"
            },
        });
    }
    let block = t.is_block_device();
    let io_err = |what| {
        move |source| OpenError::Io {
            path: path.to_owned(),
            what,
            source,
        }
    };
    // O_EXCL on a block device: refuse one that is mounted or held.
    // O_NONBLOCK: should the path have become a FIFO since the check,
    // opening must not block (fstat below refuses it).
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | if block { libc::O_EXCL } else { 0 };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(flags)
        .open(path)
        .map_err(io_err("opening"))?;
    let meta = file.metadata().map_err(io_err("examining"))?;
    if meta.file_type().is_block_device() != block || !(block || meta.file_type().is_file()) {
        return Err(OpenError::DestNotWritable {
            path: path.to_owned(),
            kind: "file that changed type while being opened",
        });
    }
    let size = if block {
        sparsekit_fiemap::Mapper::from_file(file.try_clone().map_err(io_err("opening"))?, path)?
            .size()
    } else {
        meta.len()
    };
    Ok(OpenedDest {
        file,
        kind: if block {
            DestKind::BlockDevice
        } else {
            DestKind::Regular
        },
        size,
        id: FileId::of(&meta),
        lock: None,
    })
}

/// A new file at `path` needs a folder to go in.
fn check_folder(path: &Path) -> Result<(), OpenError> {
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let fail = |source| OpenError::DestFolder {
        path: path.to_owned(),
        source,
    };
    let m = std::fs::metadata(folder).map_err(fail)?;
    if !m.is_dir() {
        return Err(fail(io::Error::from(io::ErrorKind::NotADirectory)));
    }
    nix::unistd::access(
        folder,
        nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK,
    )
    .map_err(|e| fail(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn inspecting_touches_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, b"keep me").unwrap();
        let before = std::fs::metadata(&p).unwrap();
        let d = Destination::inspect(&Spec::Path(p.clone())).unwrap();
        assert_eq!((d.kind(), d.size()), (Some(DestKind::Regular), Some(7)));
        drop(d);
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"keep me");
        assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    }

    #[test]
    fn a_new_file_needs_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = Destination::inspect(&Spec::Path(dir.path().join("new.raw"))).unwrap();
        assert_eq!(d.kind(), None);
        assert!(!dir.path().join("new.raw").exists());
        let e = Destination::inspect(&Spec::Path(dir.path().join("no/such/new.raw")));
        assert!(matches!(e, Err(OpenError::DestFolder { .. })), "{e:?}");
    }

    #[test]
    fn folders_and_fifos_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let e = Destination::inspect(&Spec::Path(dir.path().to_owned())).unwrap_err();
        assert!(e.to_string().contains("is a directory"), "{e}");
        let fifo = dir.path().join("f");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let e = Destination::inspect(&Spec::Path(fifo)).unwrap_err();
        assert!(e.to_string().contains("is a FIFO"), "{e}");
    }

    #[test]
    fn the_descriptor_inspected_is_the_one_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        std::fs::write(&p, [0u8; 8]).unwrap();
        let d = Destination::inspect(&Spec::Path(p.clone())).unwrap();
        // The path now names another file: the copy still writes the one
        // it inspected, never the newcomer.
        std::fs::rename(&p, dir.path().join("moved")).unwrap();
        std::fs::write(&p, b"newcomer").unwrap();
        let local = d.into_local().unwrap();
        local.existing.unwrap().file.write_all_at(b"x", 0).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"newcomer");
        assert_eq!(std::fs::read(dir.path().join("moved")).unwrap()[0], b'x');
    }
}
