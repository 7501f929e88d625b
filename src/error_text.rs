//! Text of errors, panics and counts for log lines and outcome messages,
//! shared by every part of the crate.

/// `err: its source: its source ...`, for one log line (errors here keep
/// their causes in `source`, so `Display` alone would drop them).
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The text of a panic payload (`panic!` gives a `&str` or a `String`).
pub(crate) fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic with a non-text payload".to_string()
    }
}

/// `n` and a noun that agrees with it: `1 instance`, `3 instances`, `0
/// groups` (nouns whose plural is their singular plus `s`).
pub(crate) fn count(n: impl TryInto<u64>, noun: &str) -> String {
    let n: u64 = n.try_into().unwrap_or(u64::MAX);
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut text = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        // Writing to a String cannot fail.
        let _ = write!(text, "{byte:02x}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_and_panics_and_hex() {
        let err = std::io::Error::other(std::fmt::Error);
        assert_eq!(
            error_chain(&err),
            "an error occurred when formatting an argument"
        );
        assert_eq!(panic_text(&"boom"), "boom");
        assert_eq!(panic_text(&String::from("bang")), "bang");
        assert_eq!(panic_text(&7u8), "panic with a non-text payload");
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        assert_eq!(count(1usize, "group"), "1 group");
        assert_eq!(count(0u32, "group"), "0 groups");
        assert_eq!(count(12u64, "restart"), "12 restarts");
    }
}
