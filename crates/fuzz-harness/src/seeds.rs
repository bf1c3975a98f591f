//! Seed inputs that are built in Rust rather than taken from the qcow2
//! fixtures: qcow2 streams from the project's own writer, and NBD server
//! transcripts from a scripted server that answers the sans-IO client.
//! `cargo xtask fuzz` writes them into the corpora; the tests below check
//! that each reaches the end of what it is meant to exercise.

use sparsekit_nbd::wire::{
    IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT,
    NBD_MAGIC, NBD_REPLY_FLAG_DONE, OPTION_REPLY_MAGIC, Opt, RepType,
};
use sparsekit_nbd::{
    ChunkHeader, ChunkType, Cookie, Handshake, HeaderMode, Negotiated, Op, ReplyHeader,
    Transmission, TransmissionFlags,
};
use sparsekit_qcow2::{StreamLayout, write_stream};

/// bmaps of small images: made by the bmap crate (SHA-256, SHA-1, no
/// checksums) and by hand in format 1.2, which has no file checksum, so
/// that mutations reach the parser behind it.
pub fn bmaps() -> Vec<(String, Vec<u8>)> {
    use sparsekit_bmap::{ChecksumType, Creator};
    let mut image = vec![0u8; 40_000];
    image[5000..9000].fill(7);
    image[30_000..].fill(1);
    let make = |kind: Option<ChecksumType>| {
        let c = Creator::new(image.len() as u64, [5000..9000, 30_000..40_000]).expect("a layout");
        match kind {
            None => c.without_checksums(),
            Some(k) => c
                .with_checksum_type(k)
                .hash(|buf: &mut [u8], at: u64| {
                    buf.copy_from_slice(&image[at as usize..at as usize + buf.len()]);
                    Ok::<_, std::io::Error>(())
                })
                .expect("hashing memory"),
        }
    };
    let v12 = "<?xml version=\"1.0\"?>\n<bmap version=\"1.2\">\n<ImageSize>40000</ImageSize>\n\
               <BlockSize>4096</BlockSize>\n<BlocksCount>10</BlocksCount>\n\
               <MappedBlocksCount>6</MappedBlocksCount>\n<BlockMap>\n<Range>1-2</Range>\n\
               <Range>5</Range>\n<Range> 7 - 9 </Range>\n</BlockMap>\n</bmap>\n";
    vec![
        (
            "sha256.bmap".into(),
            make(Some(ChecksumType::Sha256)).to_xml().into_bytes(),
        ),
        (
            "sha1.bmap".into(),
            make(Some(ChecksumType::Sha1)).to_xml().into_bytes(),
        ),
        ("none.bmap".into(), make(None).to_xml().into_bytes()),
        ("v12.bmap".into(), v12.as_bytes().to_vec()),
    ]
}

/// Streams of small disks written by [`write_stream`]: several cluster
/// sizes, data at the start, inside, across L2 tables and at an unaligned
/// end.
pub fn streams() -> Vec<(String, Vec<u8>)> {
    let layouts: [(u64, u32, &[std::ops::Range<u64>]); 6] = [
        (64 << 10, 9, &[0..512, 512..1024]),
        (
            1 << 20,
            9,
            &[0..1536, 65536..70000, (1 << 20) - 512..1 << 20],
        ),
        (1 << 20, 12, &[4096..8192, 300_000..310_000]),
        (
            8 << 20,
            12,
            &[0..8192, 3 << 20..(3 << 20) + 4096, 5 << 20..(5 << 20) + 100],
        ),
        (1_000_000, 16, &[0..65536, 900_000..1_000_000]),
        (1 << 30, 16, &[]),
    ];
    layouts
        .iter()
        .enumerate()
        .map(|(i, &(size, bits, data))| {
            let layout =
                StreamLayout::new(size, bits, data.iter().cloned()).expect("a small layout");
            let s = write_stream(Vec::new(), &layout, |g, buf| {
                for (k, b) in buf.iter_mut().enumerate() {
                    *b = (g.0 as usize / 512 + k / 64 + i) as u8;
                }
                Ok(())
            })
            .expect("writing to memory");
            (format!("writer-{i}-c{bits}"), s)
        })
        .collect()
}

/// How the scripted NBD server behaves.
#[derive(Debug, Clone, Copy)]
struct Server {
    /// Accept `NBD_OPT_EXTENDED_HEADERS`.
    extended: bool,
    /// Answer `NBD_OPT_GO` with `NBD_REP_ERR_UNSUP` (old servers), so
    /// the client falls back to `NBD_OPT_EXPORT_NAME`.
    no_go: bool,
    /// Send `NBD_FLAG_NO_ZEROES` in the greeting.
    no_zeroes: bool,
    /// Send `NBD_INFO_BLOCK_SIZE` with a minimum of 512.
    block_size: bool,
    size: u64,
    /// Transmission flags.
    flags: u16,
}

fn opt_reply(out: &mut Vec<u8>, opt: Opt, t: RepType, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&opt.0.to_be_bytes());
    out.extend_from_slice(&t.0.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The server's answers to the options in `client` (everything the client
/// sent since the last call).
fn answer(s: Server, client: &[u8], first: bool, out: &mut Vec<u8>) {
    let mut c = client;
    if first {
        c = &c[4..]; // client flags
    }
    while c.len() >= 16 {
        assert_eq!(&c[..8], &IHAVEOPT.to_be_bytes());
        let opt = Opt(u32::from_be_bytes(c[8..12].try_into().expect("4 bytes")));
        let len = u32::from_be_bytes(c[12..16].try_into().expect("4 bytes")) as usize;
        let data = &c[16..16 + len];
        c = &c[16 + len..];
        match opt {
            Opt::EXTENDED_HEADERS if !s.extended => opt_reply(out, opt, RepType::ERR_UNSUP, &[]),
            Opt::EXTENDED_HEADERS | Opt::STRUCTURED_REPLY => {
                opt_reply(out, opt, RepType::ACK, &[]);
            }
            Opt::LIST_META_CONTEXT | Opt::SET_META_CONTEXT => {
                // Export name, then the queries: answer each with an ID.
                let name_len = u32::from_be_bytes(data[..4].try_into().expect("4 bytes"));
                let mut q = &data[4 + name_len as usize + 4..];
                let mut id = 1u32;
                let mut queries = Vec::new();
                while q.len() >= 4 {
                    let n = u32::from_be_bytes(q[..4].try_into().expect("4 bytes")) as usize;
                    queries.push(q[4..4 + n].to_vec());
                    q = &q[4 + n..];
                }
                if queries.is_empty() {
                    queries = vec![b"base:allocation".to_vec(), b"qemu:dirty-bitmap:b".to_vec()];
                }
                for name in queries {
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(&name);
                    opt_reply(out, opt, RepType::META_CONTEXT, &p);
                    id += 1;
                }
                opt_reply(out, opt, RepType::ACK, &[]);
            }
            Opt::GO if s.no_go => opt_reply(out, opt, RepType::ERR_UNSUP, &[]),
            Opt::GO => {
                let mut p = NBD_INFO_EXPORT.to_be_bytes().to_vec();
                p.extend_from_slice(&s.size.to_be_bytes());
                p.extend_from_slice(&s.flags.to_be_bytes());
                opt_reply(out, opt, RepType::INFO, &p);
                if s.block_size {
                    let mut p = NBD_INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    for v in [512u32, 4096, 1 << 20] {
                        p.extend_from_slice(&v.to_be_bytes());
                    }
                    opt_reply(out, opt, RepType::INFO, &p);
                }
                opt_reply(out, opt, RepType::ACK, &[]);
            }
            Opt::EXPORT_NAME => {
                out.extend_from_slice(&s.size.to_be_bytes());
                out.extend_from_slice(&s.flags.to_be_bytes());
                if !s.no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
            }
            o => panic!("the scripted server does not know option {o:?}"),
        }
    }
}

fn chunk(
    out: &mut Vec<u8>,
    mode: HeaderMode,
    cookie: Cookie,
    flags: u16,
    t: ChunkType,
    payload: &[u8],
) {
    ReplyHeader::Chunk(ChunkHeader {
        flags,
        chunk_type: t,
        cookie,
        offset: (mode == HeaderMode::Extended).then_some(0),
        payload_len: payload.len() as u64,
    })
    .encode(out);
    out.extend_from_slice(payload);
}

/// An error chunk's payload: error, message length, message, and the
/// offset for `NBD_REPLY_TYPE_ERROR_OFFSET`.
fn error_payload(errno: u32, message: &[u8], offset: Option<u64>) -> Vec<u8> {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(message.len() as u16).to_be_bytes());
    p.extend_from_slice(message);
    if let Some(o) = offset {
        p.extend_from_slice(&o.to_be_bytes());
    }
    p
}

/// The server's reply to `op`, sent with `cookie`.
fn reply(out: &mut Vec<u8>, neg: &Negotiated, cookie: Cookie, op: Op) {
    let mode = neg.mode;
    let done = NBD_REPLY_FLAG_DONE;
    match op {
        Op::Read { length, .. } if mode.structured() => {
            let half = length / 2 / 512 * 512;
            if half > 0 {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend((0..half).map(|i| i as u8));
                chunk(out, mode, cookie, 0, ChunkType::OFFSET_DATA, &p);
            }
            let mut p = half.to_be_bytes().to_vec();
            p.extend_from_slice(&((length - half) as u32).to_be_bytes());
            chunk(out, mode, cookie, done, ChunkType::OFFSET_HOLE, &p);
        }
        Op::Read { length, .. } => {
            ReplyHeader::Simple { cookie, error: 0 }.encode(out);
            out.extend((0..length).map(|i| (i * 7) as u8));
        }
        Op::BlockStatus {
            length, req_one, ..
        } => {
            let last = neg.contexts.len();
            let both = [(length / 2, 0u64), (length - length / 2, 3)];
            // NBD_CMD_FLAG_REQ_ONE: one descriptor, at most the request.
            let descriptors = if req_one { &both[..1] } else { &both[..] };
            for (i, c) in neg.contexts.iter().enumerate() {
                let flags = if i + 1 == last { done } else { 0 };
                let mut p = c.id.0.to_be_bytes().to_vec();
                if mode == HeaderMode::Extended {
                    p.extend_from_slice(&(descriptors.len() as u32).to_be_bytes());
                    for &(l, f) in descriptors {
                        p.extend_from_slice(&l.to_be_bytes());
                        p.extend_from_slice(&f.to_be_bytes());
                    }
                    chunk(out, mode, cookie, flags, ChunkType::BLOCK_STATUS_EXT, &p);
                } else {
                    for &(l, f) in descriptors {
                        p.extend_from_slice(&(l as u32).to_be_bytes());
                        p.extend_from_slice(&(f as u32).to_be_bytes());
                    }
                    chunk(out, mode, cookie, flags, ChunkType::BLOCK_STATUS, &p);
                }
            }
        }
        // Without structured replies everything else is a simple reply.
        _ if !mode.structured() => ReplyHeader::Simple { cookie, error: 0 }.encode(out),
        // Simple replies are still allowed with structured ones.
        Op::Write { .. } if mode == HeaderMode::Structured => {
            ReplyHeader::Simple { cookie, error: 0 }.encode(out)
        }
        Op::Write { .. } | Op::WriteZeroes { .. } => {
            chunk(out, mode, cookie, done, ChunkType::NONE, &[])
        }
        Op::Trim { offset, .. } => {
            let p = error_payload(5, b"bad sector", Some(offset));
            chunk(out, mode, cookie, done, ChunkType::ERROR_OFFSET, &p);
        }
        Op::Flush => {
            let p = error_payload(28, b"", None);
            chunk(out, mode, cookie, done, ChunkType::ERROR, &p);
        }
    }
}

/// One whole conversation: the option byte of [`crate::nbd_client`], the
/// server's handshake, then its replies to the requests
/// [`crate::nbd_requests`] sends, last request first.
fn transcript(opts: u8, s: Server) -> Vec<u8> {
    let mut hs = Handshake::new(crate::nbd_config(opts)).expect("a valid config");
    let mut server = Vec::new();
    server.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    server.extend_from_slice(&IHAVEOPT.to_be_bytes());
    let mut flags = NBD_FLAG_FIXED_NEWSTYLE;
    if s.no_zeroes {
        flags |= NBD_FLAG_NO_ZEROES;
    }
    server.extend_from_slice(&flags.to_be_bytes());
    let mut fed = 0;
    let mut first = true;
    let neg = loop {
        let n = hs.wanted();
        let piece = &server[fed..fed + n];
        fed += n;
        if let Some(neg) = hs.feed(piece).expect("the scripted server is right") {
            break neg;
        }
        let out = hs.take_output();
        if !out.is_empty() {
            answer(s, &out, first, &mut server);
            first = false;
        }
    };
    assert_eq!(fed, server.len(), "the client read everything");

    let mut t = Transmission::new(&neg);
    let (_, sent) = crate::nbd_requests(opts, &neg, &mut t);
    // Cookies count from 1 in the order the requests were sent.
    for (i, op) in sent.iter().enumerate().rev() {
        reply(&mut server, &neg, Cookie(i as u64 + 1), *op);
    }
    let mut input = vec![opts];
    input.extend_from_slice(&server);
    input
}

/// Server transcripts for the `nbd_client` target: compact and extended
/// headers, simple replies, `NBD_OPT_EXPORT_NAME` with and without the
/// zero padding, context listing, one and two contexts, and replies to
/// writes, write zeroes, trim and flush (acknowledged and refused).
pub fn nbd_transcripts() -> Vec<(String, Vec<u8>)> {
    let base = Server {
        extended: true,
        no_go: false,
        no_zeroes: true,
        block_size: true,
        size: 1 << 20,
        flags: TransmissionFlags::HAS_FLAGS,
    };
    let writable = Server {
        flags: TransmissionFlags::HAS_FLAGS
            | TransmissionFlags::SEND_FLUSH
            | TransmissionFlags::SEND_FUA
            | TransmissionFlags::SEND_TRIM
            | TransmissionFlags::SEND_WRITE_ZEROES
            | TransmissionFlags::SEND_FAST_ZERO,
        ..base
    };
    let cases: [(&str, u8, Server); 11] = [
        ("structured-base", 0x11, base),
        ("extended-two-contexts", 0x23, base),
        (
            "extended-refused",
            0x13,
            Server {
                extended: false,
                ..base
            },
        ),
        (
            "list-contexts",
            0x1d,
            Server {
                block_size: false,
                ..base
            },
        ),
        (
            "simple",
            0x00,
            Server {
                size: 10_000,
                ..base
            },
        ),
        (
            "export-name",
            0x01,
            Server {
                no_go: true,
                ..base
            },
        ),
        (
            "export-name-zeroes",
            0x08,
            Server {
                no_go: true,
                no_zeroes: false,
                ..base
            },
        ),
        ("req-one", 0x51, base),
        ("writes", 0x91, writable),
        ("writes-extended", 0x93, writable),
        ("writes-simple", 0x80, writable),
    ];
    cases
        .iter()
        .map(|&(name, opts, s)| (format!("transcript-{name}"), transcript(opts, s)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transcript_completes_every_request() {
        use sparsekit_nbd::{Command, Errno, Reply};
        let mut commands = std::collections::BTreeSet::new();
        for (name, t) in nbd_transcripts() {
            let (sent, done, left) = crate::nbd_conversation(&t).expect(&name);
            assert!(!sent.is_empty(), "{name}");
            assert_eq!(done.len(), sent.len(), "{name}: {done:?}");
            assert_eq!(left, 0, "{name}: bytes left over");
            for c in done {
                commands.insert(c.command.0);
                let errno = c.outcome.as_ref().err().map(|e| e.errno);
                match c.command {
                    Command::READ => assert_eq!(c.outcome, Ok(Reply::Read), "{name}"),
                    Command::BLOCK_STATUS => {
                        assert!(matches!(c.outcome, Ok(Reply::Status(_))), "{name}")
                    }
                    Command::TRIM if t[0] & 1 != 0 => assert_eq!(errno, Some(Errno::EIO)),
                    Command::FLUSH if t[0] & 1 != 0 => assert_eq!(errno, Some(Errno::ENOSPC)),
                    _ => assert_eq!(c.outcome, Ok(Reply::Ack), "{name}"),
                }
            }
        }
        // Every command with a reply is exercised.
        assert_eq!(commands.into_iter().collect::<Vec<_>>(), [0, 1, 3, 4, 6, 7]);
    }

    #[test]
    fn every_bmap_seed_parses() {
        for (name, text) in bmaps() {
            let r = sparsekit_bmap::Bmap::parse(&text, &name);
            assert!(r.is_ok(), "{name}: {r:?}");
            crate::bmap(&text);
        }
    }

    #[test]
    fn every_stream_decodes() {
        for (name, s) in streams() {
            let chunks = crate::decode_stream(std::io::Cursor::new(&s));
            assert!(chunks.iter().all(|c| c.0 != u64::MAX), "{name}: {chunks:?}");
            crate::qcow2_stream(&s);
        }
    }
}
