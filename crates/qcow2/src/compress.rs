//! Decompressing compressed clusters (qcow2.rst "Compressed Clusters
//! Descriptor"; qemu's block/qcow2-threads.c).

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};

use crate::header::CompressionType;

/// Decompresses one cluster of `cluster_size` bytes from `input`, which
/// may carry trailing bytes of the next compressed cluster. Like qemu,
/// anything short of a full cluster is an error.
pub fn decompress(
    kind: CompressionType,
    input: &[u8],
    cluster_size: usize,
) -> Result<Vec<u8>, String> {
    let mut out = vec![0; cluster_size];
    decompress_into(kind, input, &mut out)?;
    Ok(out)
}

/// Decompresses one cluster from `input` into `out`, which is exactly one
/// cluster long: [`decompress`] without the allocation, for readers that
/// want the whole cluster in their own buffer.
pub fn decompress_into(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let cluster_size = out.len();
    match kind {
        CompressionType::Zlib => {
            // Raw deflate, no zlib header (qemu: inflateInit2 with -12).
            let mut d = Decompress::new(false);
            let status = d
                .decompress(input, out, FlushDecompress::Finish)
                .map_err(|e| format!("deflate: {e}"))?;
            if d.total_out() as usize != cluster_size {
                return Err(format!(
                    "deflate produced {} of {cluster_size} bytes ({status:?})",
                    d.total_out()
                ));
            }
            let _ = Status::Ok;
        }
        CompressionType::Zstd => {
            let mut d = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            while outb.pos() < cluster_size {
                let before = (inb.pos(), outb.pos());
                d.run(&mut inb, &mut outb)
                    .map_err(|e| format!("zstd: {e}"))?;
                if (inb.pos(), outb.pos()) == before {
                    break;
                }
            }
            if outb.pos() != cluster_size {
                return Err(format!(
                    "zstd produced {} of {cluster_size} bytes",
                    outb.pos()
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn raw_deflate_round_trip_with_trailing_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 7) as u8).collect();
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&data).unwrap();
        let mut c = e.finish().unwrap();
        c.extend_from_slice(&[0xff; 100]);
        assert_eq!(decompress(CompressionType::Zlib, &c, 4096).unwrap(), data);
        assert!(decompress(CompressionType::Zlib, &c, 8192).is_err());
    }

    #[test]
    fn zstd_round_trip() {
        let data = vec![0xabu8; 65536];
        let mut c = zstd::bulk::compress(&data, 3).unwrap();
        c.extend_from_slice(&[0; 37]);
        assert_eq!(decompress(CompressionType::Zstd, &c, 65536).unwrap(), data);
        assert!(decompress(CompressionType::Zstd, b"garbage", 512).is_err());
    }
}
