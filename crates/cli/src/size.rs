//! Sizes from people, read as qemu-img reads them: `qemu_strtosz` (qemu's
//! util/cutils.c `do_strtosz`, as rewritten for qemu 8.1) followed by
//! qemu-img's range check (`cvtnum`: at most `INT64_MAX`).
//!
//! - a decimal integer: `4096`, `08` (decimal, not octal), leading
//!   whitespace and a `+` allowed;
//! - `0x` hexadecimal: `0x1000`, with no fraction and no suffix (`0x1b` is
//!   27: `b` and `e` are hex digits);
//! - either followed by one suffix, any case: `B` (bytes), `K`, `M`, `G`,
//!   `T`, `P`, `E` (powers of 1024): `64k`, `1E`, `2b`;
//! - a decimal fraction, either side of the point may be empty (`1.`,
//!   `.5M`), with a suffix unless the fraction is zero; the result is
//!   rounded to the nearest byte, halves up: `1.5G`, `12.345M`.
//!
//! Not sizes: negative values (`-0` too), exponents (`1e3` is `1E` then
//! junk), octal, binary, `inf`, `nan`, trailing whitespace, two-letter
//! suffixes (`10MB`, `1KiB`), and anything above 2^63 - 1 (`8E`).

/// The largest size qemu-img takes (`INT64_MAX`, from `cvtnum`).
pub const MAX_SIZE: u64 = i64::MAX as u64;

/// What a size looks like, for error messages.
const SYNTAX: &str = "a size is a number of bytes with an optional suffix: \
                      4096, 0x1000, 64k, 1.5G (k, M, G, T, P, E: powers of 1024)";

/// Parses a size as `qemu-img` does (`qemu-img create`, `measure --size`,
/// `map --start-offset`): see the [module documentation](self). The error
/// names the input and says what a size looks like.
///
/// ```
/// use sparsekit_cli::size::parse_size;
/// assert_eq!(parse_size("1.5k"), Ok(1536));
/// assert_eq!(parse_size("0x1000"), Ok(4096));
/// assert!(parse_size("10MB").is_err());
/// ```
pub fn parse_size(s: &str) -> Result<u64, String> {
    let shown = s.escape_debug();
    match strtosz(s.as_bytes()) {
        Ok(n) if n <= MAX_SIZE => Ok(n),
        Ok(_) | Err(Refusal::TooLarge) => Err(format!(
            "invalid size '{shown}': sizes go up to {MAX_SIZE} bytes (2^63 - 1), as in qemu-img"
        )),
        Err(Refusal::Negative) => Err(format!("invalid size '{shown}': a size cannot be negative")),
        Err(Refusal::FractionOfByte) => Err(format!(
            "invalid size '{shown}': not a whole number of bytes (a fraction needs a suffix, as in 1.5k)"
        )),
        Err(Refusal::Syntax) => Err(format!("invalid size '{shown}': {SYNTAX}")),
    }
}

/// Why `qemu_strtosz` refuses an input (its `-EINVAL` is `Syntax` and
/// `FractionOfByte`, its `-ERANGE` is `Negative` and `TooLarge`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Syntax,
    FractionOfByte,
    Negative,
    TooLarge,
}

/// `qemu_strtosz(s, NULL, &result)`: the whole input must be used.
fn strtosz(s: &[u8]) -> Result<u64, Refusal> {
    let mut end = 0;
    let r = scan(s, &mut end);
    // With no end pointer, leftover input is -EINVAL even after an -ERANGE
    // (qemu's "EINVAL has priority over ERANGE": `-1k` is junk, `-1` is
    // negative).
    if r != Err(Refusal::Syntax) && end != s.len() {
        return Err(Refusal::Syntax);
    }
    r
}

/// `do_strtosz` with unit 1024 and default suffix `B`, setting `end` where
/// qemu leaves its end pointer (only used after success or -ERANGE).
fn scan(s: &[u8], end: &mut usize) -> Result<u64, Refusal> {
    let at = |i: usize| s.get(i).copied().unwrap_or(0);
    // strtoull's and strtod's prefix: C-locale whitespace, one sign.
    let mut p = s.iter().take_while(|c| is_space(**c)).count();
    let negative = at(p) == b'-';
    if matches!(at(p), b'+' | b'-') {
        p += 1;
    }
    let digits = s[p..].iter().take_while(|c| c.is_ascii_digit()).count();

    let mut val: u64;
    let fraction: Option<(usize, usize)>; // the fraction's digits, s[from..to]
    if digits > 0 {
        // parse_uint(nptr, 10): overflow and any '-' are -ERANGE.
        *end = p + digits;
        if negative {
            return Err(Refusal::Negative);
        }
        val = decimal(&s[p..p + digits]).ok_or(Refusal::TooLarge)?;
        if val == 0 && matches!(at(*end), b'x' | b'X') {
            // Looks like hex: reparse in base 16, as strtoull does (the
            // `0x` prefix counts only when a hex digit follows it).
            let from = if at(p + 1).eq_ignore_ascii_case(&b'x') && at(p + 2).is_ascii_hexdigit() {
                p + 2
            } else {
                p
            };
            let n = s[from..]
                .iter()
                .take_while(|c| c.is_ascii_hexdigit())
                .count();
            *end = from + n;
            val = hex(&s[from..from + n]).ok_or(Refusal::TooLarge)?;
            // No fraction and no suffix on hex.
            if at(*end) == b'.' || suffix_shift(at(*end)).is_some() {
                return Err(Refusal::Syntax);
            }
            fraction = None;
        } else if at(*end) == b'.' {
            let from = *end + 1;
            let n = s[from..].iter().take_while(|c| c.is_ascii_digit()).count();
            // `1.` and `1.k`: an empty fraction.
            *end = from + n;
            fraction = Some((from, from + n));
        } else {
            fraction = None;
        }
    } else {
        // No digits first: only strtod's `[+-].DIGITS` can be a size.
        if at(p) != b'.' || !at(p + 1).is_ascii_digit() {
            return Err(Refusal::Syntax);
        }
        let n = s[p + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
        *end = p + 1 + n;
        // strtod gave a negative number or -0.0: signbit() is -ERANGE.
        if negative {
            return Err(Refusal::Negative);
        }
        val = 0;
        fraction = Some((p + 1, p + 1 + n));
    }

    let mut valf = 0;
    if let Some((from, to)) = fraction {
        // qemu reads the fraction with strtod (correctly rounded, as Rust's
        // parse is) and keeps it as 64-bit fixed point, truncated; any
        // non-zero digit, even one that underflows, leaves it non-zero.
        let text = std::str::from_utf8(&s[from - 1..to]).map_err(|_| Refusal::Syntax)?;
        let f: f64 = if to > from {
            text.parse().map_err(|_| Refusal::Syntax)?
        } else {
            0.0
        };
        if f == 1.0 {
            val = val.checked_add(1).ok_or(Refusal::TooLarge)?;
        } else {
            valf = (f * 18_446_744_073_709_551_616.0) as u64;
            if valf == 0 && s[from..to].iter().any(|&c| c != b'0') {
                valf = 1;
            }
        }
    }

    let shift = suffix_shift(at(*end));
    if shift.is_some() {
        *end += 1;
    }
    match shift {
        None | Some(0) if valf != 0 => Err(Refusal::FractionOfByte),
        None | Some(0) => Ok(val),
        Some(shift) => {
            // 64.64 fixed point times 2^shift, halves rounded up.
            let whole = u128::from(val) << shift;
            let part = u128::from(valf) << shift;
            let n = whole + (part >> 64) + ((part >> 63) & 1);
            u64::try_from(n).map_err(|_| Refusal::TooLarge)
        }
    }
}

/// isspace() in the C locale.
fn is_space(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\x0b' | b'\x0c' | b'\r')
}

/// qemu's `suffix_mul` for unit 1024, as a power of two.
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// Decimal digits to a number; `None` past `u64::MAX`.
fn decimal(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

/// Hex digits to a number; `None` past `u64::MAX`.
fn hex(digits: &[u8]) -> Option<u64> {
    digits.iter().try_fold(0u64, |n, &d| {
        let v = (d as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(v))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    const E: u64 = 1 << 60;

    fn ok(s: &str) -> u64 {
        parse_size(s).unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    fn refused(s: &str) -> Refusal {
        match strtosz(s.as_bytes()) {
            Ok(n) if n > MAX_SIZE => Refusal::TooLarge,
            Ok(n) => panic!("{s:?} parsed as {n}"),
            Err(r) => r,
        }
    }

    #[test]
    fn integers_and_suffixes() {
        assert_eq!(ok("0"), 0);
        assert_eq!(ok("4096"), 4096);
        assert_eq!(ok("+1"), 1);
        assert_eq!(ok(" \t1"), 1);
        assert_eq!(ok("08"), 8, "decimal, not octal");
        assert_eq!(ok("010"), 10);
        for (suffix, mul) in [("b", 1), ("k", K), ("m", M), ("g", G), ("t", K * G)] {
            assert_eq!(ok(&format!("3{suffix}")), 3 * mul, "{suffix}");
            assert_eq!(ok(&format!("3{}", suffix.to_uppercase())), 3 * mul);
        }
        assert_eq!(ok("1p"), 1 << 50);
        assert_eq!(ok("1E"), E);
        assert_eq!(ok("7E"), 7 * E);
    }

    #[test]
    fn hex() {
        assert_eq!(ok("0x1000"), 4096);
        assert_eq!(ok("0XfF"), 255);
        assert_eq!(ok("0x1b"), 27, "b is a hex digit, not bytes");
        assert_eq!(ok("0x7fffffffffffffff"), MAX_SIZE);
        assert_eq!(refused("0x10k"), Refusal::Syntax);
        assert_eq!(refused("0x1.8"), Refusal::Syntax);
        assert_eq!(refused("0x"), Refusal::Syntax);
        assert_eq!(refused("00x5"), Refusal::Syntax);
        assert_eq!(refused("0x8000000000000000"), Refusal::TooLarge);
        assert_eq!(refused("0x10000000000000000"), Refusal::TooLarge);
    }

    #[test]
    fn fractions_round_halves_up() {
        assert_eq!(ok("1.5k"), 1536);
        assert_eq!(ok(".5M"), M / 2);
        assert_eq!(ok("1."), 1, "an empty fraction needs no suffix");
        assert_eq!(ok("1.0"), 1);
        assert_eq!(ok("1.k"), K);
        assert_eq!(ok("12.345M"), (12.345 * M as f64 + 0.5) as u64);
        assert_eq!(ok("1.9999k"), 2048);
        // 0.0005k = 0.512 bytes: rounds up; 0.0004k = 0.4096: down.
        assert_eq!(ok("0.0005k"), 1);
        assert_eq!(ok("0.0004k"), 0);
        // strtod rounds the fraction to 1.0: a whole number of bytes.
        assert_eq!(ok("1.99999999999999999999"), 2);
        assert_eq!(ok("7.9E"), 9_108_079_886_394_091_136);
        assert_eq!(refused("1.5"), Refusal::FractionOfByte);
        assert_eq!(refused("1.5b"), Refusal::FractionOfByte);
        // An underflowing fraction is still a fraction.
        let tiny = format!("1.{}1B", "0".repeat(350));
        assert_eq!(refused(&tiny), Refusal::FractionOfByte);
        assert_eq!(refused("."), Refusal::Syntax);
        assert_eq!(refused(".k"), Refusal::Syntax);
        assert_eq!(refused("1.5e3"), Refusal::Syntax, "1.5E then junk");
        assert_eq!(ok("1.5e"), E + E / 2);
    }

    #[test]
    fn refusals() {
        for s in [
            "", " ", "k", "1 ", "10MB", "1KiB", "1e3", "0b101", "inf", "nan", "1k2",
        ] {
            assert_eq!(refused(s), Refusal::Syntax, "{s:?}");
        }
        for s in ["-1", "-0", " -0", "-.5", "-.0"] {
            assert_eq!(refused(s), Refusal::Negative, "{s:?}");
        }
        // Leftover input turns a range error into junk, as in qemu.
        assert_eq!(refused("-1k"), Refusal::Syntax);
        assert_eq!(refused("-.5k"), Refusal::Syntax);
        assert_eq!(refused("100000Pjunk"), Refusal::Syntax);
        for s in ["8E", "16E", "18446744073709551616", "9223372036854775808"] {
            assert_eq!(refused(s), Refusal::TooLarge, "{s:?}");
        }
        assert_eq!(ok("9223372036854775807"), MAX_SIZE);
        let just_under_16e = format!("15.{}E", "9".repeat(52));
        assert_eq!(refused(&just_under_16e), Refusal::TooLarge);
    }

    #[test]
    fn messages_name_the_input() {
        let e = parse_size("10MB").unwrap_err();
        assert_eq!(
            e,
            "invalid size '10MB': a size is a number of bytes with an optional suffix: \
             4096, 0x1000, 64k, 1.5G (k, M, G, T, P, E: powers of 1024)"
        );
        assert!(
            parse_size("8E")
                .unwrap_err()
                .contains("9223372036854775807")
        );
        assert!(parse_size("-1").unwrap_err().contains("negative"));
        assert!(
            parse_size("1\n")
                .unwrap_err()
                .starts_with("invalid size '1\\n'")
        );
    }
}
