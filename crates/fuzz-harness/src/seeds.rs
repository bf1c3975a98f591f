//! Seed inputs that are built in Rust rather than taken from the qcow2
//! fixtures: qcow2 streams from the project's own writer, and NBD server
//! transcripts from a scripted server that answers the sans-IO client.
//! `cargo xtask fuzz` writes them into the corpora; the tests below check
//! that each reaches the end of what it is meant to exercise.

use sparsekit_nbd::wire::{
    IHAVEOPT, NBD_FLAG_FIXED_NEWSTYLE, NBD_FLAG_NO_ZEROES, NBD_INFO_BLOCK_SIZE, NBD_INFO_EXPORT,
    NBD_MAGIC, NBD_REPLY_FLAG_DONE, OPTION_REPLY_MAGIC, Opt, RepType,
};
use sparsekit_nbd::{ChunkHeader, ChunkType, Cookie, Handshake, HeaderMode, ReplyHeader};
use sparsekit_qcow2::{StreamLayout, write_stream};

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
                p.extend_from_slice(&0x0001u16.to_be_bytes()); // has flags
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
                out.extend_from_slice(&0x0001u16.to_be_bytes());
                if !s.no_zeroes {
                    out.extend_from_slice(&[0; 124]);
                }
            }
            o => panic!("the scripted server does not know option {o:?}"),
        }
    }
}

fn chunk(out: &mut Vec<u8>, mode: HeaderMode, flags: u16, t: ChunkType, payload: &[u8]) {
    ReplyHeader::Chunk(ChunkHeader {
        flags,
        chunk_type: t,
        cookie: Cookie(1),
        offset: (mode == HeaderMode::Extended).then_some(0),
        payload_len: payload.len() as u64,
    })
    .encode(out);
    out.extend_from_slice(payload);
}

/// One whole conversation: the option byte of [`crate::nbd_client`], the
/// server's handshake, its reply to the read and to block status.
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

    let mode = neg.mode;
    let min = u64::from(neg.block_size.minimum);
    let len = neg.size.min(65536) / min * min;
    if len > 0 {
        if mode.structured() {
            let half = len / 2 / min * min;
            if half > 0 {
                let mut p = 0u64.to_be_bytes().to_vec();
                p.extend((0..half).map(|i| i as u8));
                chunk(&mut server, mode, 0, ChunkType::OFFSET_DATA, &p);
            }
            let mut p = half.to_be_bytes().to_vec();
            p.extend_from_slice(&((len - half) as u32).to_be_bytes());
            chunk(
                &mut server,
                mode,
                NBD_REPLY_FLAG_DONE,
                ChunkType::OFFSET_HOLE,
                &p,
            );
        } else {
            ReplyHeader::Simple {
                cookie: Cookie(1),
                error: 0,
            }
            .encode(&mut server);
            server.extend((0..len).map(|i| (i * 7) as u8));
        }
    }
    let len = neg.size.min(1 << 20);
    if len > 0 && mode.structured() {
        let last = neg.contexts.len();
        for (i, c) in neg.contexts.iter().enumerate() {
            let flags = if i + 1 == last {
                NBD_REPLY_FLAG_DONE
            } else {
                0
            };
            let descriptors = [(len / 2, 0u64), (len - len / 2, 3)];
            let mut p = c.id.0.to_be_bytes().to_vec();
            if mode == HeaderMode::Extended {
                p.extend_from_slice(&2u32.to_be_bytes());
                for (l, f) in descriptors {
                    p.extend_from_slice(&l.to_be_bytes());
                    p.extend_from_slice(&f.to_be_bytes());
                }
                chunk(&mut server, mode, flags, ChunkType::BLOCK_STATUS_EXT, &p);
            } else {
                for (l, f) in descriptors {
                    p.extend_from_slice(&(l as u32).to_be_bytes());
                    p.extend_from_slice(&(f as u32).to_be_bytes());
                }
                chunk(&mut server, mode, flags, ChunkType::BLOCK_STATUS, &p);
            }
        }
    }
    let mut input = vec![opts];
    input.extend_from_slice(&server);
    input
}

/// Server transcripts for the `nbd_client` target: compact and extended
/// headers, simple replies, `NBD_OPT_EXPORT_NAME` with and without the
/// zero padding, context listing, one and two contexts.
pub fn nbd_transcripts() -> Vec<(String, Vec<u8>)> {
    let base = Server {
        extended: true,
        no_go: false,
        no_zeroes: true,
        block_size: true,
        size: 1 << 20,
    };
    let cases: [(&str, u8, Server); 8] = [
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
    fn every_transcript_negotiates_and_is_consumed() {
        for (name, t) in nbd_transcripts() {
            let mut data = &t[1..];
            let neg = crate::handshake(t[0], &mut data).expect(&name);
            assert!(neg.size > 0, "{name}");
            crate::nbd_client(&t);
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
