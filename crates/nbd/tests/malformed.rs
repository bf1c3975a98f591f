//! A fake server in a thread sends malformed replies; the client must
//! return a clear error, never panic, hang or allocate what the wire asks.

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use sparsekit_nbd::wire::NBD_REPLY_FLAG_DONE;
use sparsekit_nbd::{
    ChunkHeader, ChunkType, Client, ClientConfig, Cookie, Error, NbdUri, ProtocolError,
    ReplyHeader, Request,
};

const SIZE: u64 = 1 << 20;

/// One option reply: magic, option, type, length, payload.
fn opt_reply(opt: u32, t: u32, p: &[u8]) -> Vec<u8> {
    let mut v = 0x0003_e889_0455_65a9_u64.to_be_bytes().to_vec();
    v.extend(opt.to_be_bytes());
    v.extend(t.to_be_bytes());
    v.extend((p.len() as u32).to_be_bytes());
    v.extend(p);
    v
}

/// Serves one connection: a structured-reply handshake, then answers the
/// first request with `reply(request)` and waits for the client to leave.
fn fake_server(
    hang_up: bool,
    reply: impl FnOnce(Request) -> Vec<u8> + Send + 'static,
) -> (tempfile::TempDir, String, std::thread::JoinHandle<()>) {
    let mut reply = Some(reply);
    fake_server_with(SIZE, 1, hang_up, move |r| {
        (reply.take().expect("one request"))(r)
    })
}

/// As [`fake_server`], for an export of `size` bytes, answering `requests`
/// requests.
fn fake_server_with(
    size: u64,
    requests: usize,
    hang_up: bool,
    mut reply: impl FnMut(Request) -> Vec<u8> + Send + 'static,
) -> (tempfile::TempDir, String, std::thread::JoinHandle<()>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let uri = NbdUri::unix(&sock, "").to_string();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"NBDMAGICIHAVEOPT\x00\x03").unwrap();
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap()) as usize;
            let mut data = vec![0u8; len];
            s.read_exact(&mut data).unwrap();
            match opt {
                11 => s.write_all(&opt_reply(11, (1 << 31) + 1, &[])).unwrap(),
                8 => s.write_all(&opt_reply(8, 1, &[])).unwrap(),
                10 => {
                    let mut m = 1u32.to_be_bytes().to_vec();
                    m.extend(b"base:allocation");
                    s.write_all(&opt_reply(10, 4, &m)).unwrap();
                    s.write_all(&opt_reply(10, 1, &[])).unwrap();
                }
                7 => {
                    let mut i = vec![0, 0];
                    i.extend(size.to_be_bytes());
                    i.extend(1u16.to_be_bytes());
                    s.write_all(&opt_reply(7, 3, &i)).unwrap();
                    s.write_all(&opt_reply(7, 1, &[])).unwrap();
                    break;
                }
                o => panic!("unexpected option {o}"),
            }
        }
        for _ in 0..requests {
            let mut req = [0u8; 28];
            s.read_exact(&mut req).unwrap();
            let req = Request::parse(&req).unwrap();
            let _ = s.write_all(&reply(req));
        }
        if hang_up {
            return;
        }
        // Wait for the client to hang up (or the timeout).
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
    });
    (dir, uri, t)
}

fn chunk(flags: u16, t: ChunkType, cookie: Cookie, payload_len: u64) -> Vec<u8> {
    let mut v = Vec::new();
    ReplyHeader::Chunk(ChunkHeader {
        flags,
        chunk_type: t,
        cookie,
        offset: None,
        payload_len,
    })
    .encode(&mut v);
    v
}

/// A whole final chunk: header and `payload`.
fn final_chunk(t: ChunkType, cookie: Cookie, payload: &[u8]) -> Vec<u8> {
    let mut v = chunk(NBD_REPLY_FLAG_DONE, t, cookie, payload.len() as u64);
    v.extend(payload);
    v
}

/// Connects, reads 4 KiB at 4 KiB, returns the error.
fn read_error(reply: impl FnOnce(Request) -> Vec<u8> + Send + 'static) -> Error {
    read_error_with(false, Duration::from_secs(5), reply)
}

fn read_error_with(
    hang_up: bool,
    timeout: Duration,
    reply: impl FnOnce(Request) -> Vec<u8> + Send + 'static,
) -> Error {
    let (_dir, uri, t) = fake_server(hang_up, reply);
    let config = ClientConfig {
        timeout: Some(timeout),
        ..ClientConfig::default()
    };
    let mut c = Client::connect_with(&NbdUri::parse(&uri).unwrap(), &config).unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 4096];
    let err = c.read(4096, &mut buf).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(8), "took too long");
    drop(c);
    t.join().unwrap();
    err
}

fn protocol(e: &Error) -> &ProtocolError {
    match e {
        Error::Protocol { source, .. } => source,
        e => panic!("expected a protocol error, got {e:?}"),
    }
}

#[test]
fn wrong_cookie() {
    let e = read_error(|r| {
        let mut v = chunk(
            NBD_REPLY_FLAG_DONE,
            ChunkType::NONE,
            Cookie(r.cookie.0 + 99),
            0,
        );
        v.extend([0u8; 0]);
        v
    });
    assert!(
        matches!(protocol(&e), ProtocolError::UnknownCookie { .. }),
        "{e}"
    );
}

#[test]
fn data_chunk_past_requested_range() {
    let e = read_error(|r| {
        let mut v = chunk(
            NBD_REPLY_FLAG_DONE,
            ChunkType::OFFSET_DATA,
            r.cookie,
            8 + 4096,
        );
        v.extend((r.offset + 2048).to_be_bytes()); // half outside the request
        v.extend([7u8; 4096]);
        v
    });
    assert!(
        matches!(protocol(&e), ProtocolError::ChunkOutsideRequest { .. }),
        "{e}"
    );
    assert!(
        e.to_string().contains("NBD_CMD_READ at 0x1000+0x1000"),
        "{e}"
    );
}

#[test]
fn oversized_data_length_is_refused_before_reading() {
    let e = read_error(|r| {
        // Claims 4 GiB of data; sends nothing more.
        chunk(
            NBD_REPLY_FLAG_DONE,
            ChunkType::OFFSET_DATA,
            r.cookie,
            u32::MAX.into(),
        )
    });
    assert!(
        matches!(protocol(&e), ProtocolError::ChunkTooLong { .. }),
        "{e}"
    );
}

#[test]
fn oversized_error_message_is_refused() {
    let e = read_error(|r| chunk(NBD_REPLY_FLAG_DONE, ChunkType::ERROR, r.cookie, 1 << 30));
    assert!(
        matches!(protocol(&e), ProtocolError::ChunkTooLong { .. }),
        "{e}"
    );
}

#[test]
fn bad_reply_magic() {
    let e = read_error(|_| vec![0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
    assert!(
        matches!(
            protocol(&e),
            ProtocolError::BadMagic {
                found: 0xdead_beef,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn reply_missing_bytes() {
    let e = read_error(|r| {
        let mut v = chunk(NBD_REPLY_FLAG_DONE, ChunkType::OFFSET_HOLE, r.cookie, 12);
        v.extend(r.offset.to_be_bytes());
        v.extend(1024u32.to_be_bytes()); // only 1 KiB of the 4 KiB
        v
    });
    assert!(
        matches!(
            protocol(&e),
            ProtocolError::ReadIncomplete { missing: 3072, .. }
        ),
        "{e}"
    );
}

/// A header promising 4 KiB of data, then only 100 bytes.
fn truncated(r: Request) -> Vec<u8> {
    let mut v = chunk(
        NBD_REPLY_FLAG_DONE,
        ChunkType::OFFSET_DATA,
        r.cookie,
        8 + 4096,
    );
    v.extend(r.offset.to_be_bytes());
    v.extend([1u8; 100]);
    v
}

#[test]
fn server_hangs_up_mid_reply() {
    let e = read_error_with(true, Duration::from_secs(5), truncated);
    assert!(matches!(e, Error::Closed { .. }), "{e:?}");
}

#[test]
fn server_stalls_mid_reply() {
    let e = read_error_with(false, Duration::from_millis(500), truncated);
    assert!(matches!(e, Error::Timeout { .. }), "{e:?}");
}

#[test]
fn simple_reply_to_structured_read() {
    let e = read_error(|r| {
        let mut v = Vec::new();
        ReplyHeader::Simple {
            cookie: r.cookie,
            error: 0,
        }
        .encode(&mut v);
        v
    });
    assert!(
        matches!(protocol(&e), ProtocolError::SimpleReplyToStructuredRead),
        "{e}"
    );
}

/// A status request longer than the maximum payload (the spec allows it)
/// refused with NBD_EINVAL is asked again within the maximum payload.
#[test]
fn oversized_status_request_refused_is_retried_within_the_payload_limit() {
    const BIG: u64 = 256 << 20;
    let lengths = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = lengths.clone();
    let (_dir, uri, t) = fake_server_with(BIG, 2, false, move |r| {
        seen.lock().unwrap().push(r.length);
        if r.length > 32 << 20 {
            let mut p = 22u32.to_be_bytes().to_vec();
            p.extend(0u16.to_be_bytes());
            return final_chunk(ChunkType::ERROR, r.cookie, &p);
        }
        // One extent: the whole request is data.
        let mut p = 1u32.to_be_bytes().to_vec();
        p.extend((r.length as u32).to_be_bytes());
        p.extend(0u32.to_be_bytes());
        final_chunk(ChunkType::BLOCK_STATUS, r.cookie, &p)
    });
    let mut c = Client::connect(&uri).unwrap();
    let got = c.block_status_once("base:allocation", 0..BIG).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].offset, got[0].length), (0, 32 << 20));
    drop(c);
    t.join().unwrap();
    assert_eq!(*lengths.lock().unwrap(), [BIG, 32 << 20]);
}
