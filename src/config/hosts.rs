//! Host ranges, as pdsh and ClusterShell write them: `web[01-16]`,
//! `db[1,3,5]`, `rack[1-2]-node[1-3]`.
//!
//! A bracket group whose content is a list of numbers and ranges expands
//! into one name per number, in the order written; a start with leading
//! zeros gives its width to every number of the range (`[01-16]`: `01` to
//! `16`; `[1-16]`: `1` to `16`). Several groups expand as a product, the
//! first the slowest. Brackets around an IPv6 address (`[::1]:2222`, with
//! a `:` inside) are left as they are.

/// The most names one entry may expand to: a typo such as `[1-100000000]`
/// is an error, not a hang.
pub const MAX_EXPANSION: usize = 100_000;

/// The names `entry` stands for: itself when it has no range, else its
/// expansion. The error is the whole message, for the caller to place.
pub fn expand(entry: &str) -> Result<Vec<String>, String> {
    let mut names = vec![String::new()];
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|at| open + at) else {
            // An unmatched bracket is the host parser's to report.
            break;
        };
        let inside = &rest[open + 1..close];
        let prefix = &rest[..open];
        if inside.contains(':') {
            // An IPv6 address: kept as it is.
            append(&mut names, &rest[..=close]);
            rest = &rest[close + 1..];
            continue;
        }
        let numbers = range_list(inside)
            .map_err(|reason| format!("invalid host range [{inside}] in {entry:?}: {reason}"))?;
        let total = names.len().saturating_mul(numbers.len());
        if total > MAX_EXPANSION {
            return Err(format!(
                "host range {entry:?} stands for more than {MAX_EXPANSION} hosts"
            ));
        }
        let mut next = Vec::with_capacity(total);
        for name in &names {
            for number in &numbers {
                next.push(format!("{name}{prefix}{number}"));
            }
        }
        names = next;
        rest = &rest[close + 1..];
    }
    append(&mut names, rest);
    Ok(names)
}

/// Whether `entry` holds a host range (a bracket group without a `:`).
pub fn is_range(entry: &str) -> bool {
    let mut rest = entry;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']').map(|at| open + at) else {
            return false;
        };
        if !rest[open + 1..close].contains(':') {
            return true;
        }
        rest = &rest[close + 1..];
    }
    false
}

/// Appends `text` to every name.
fn append(names: &mut [String], text: &str) {
    for name in names {
        name.push_str(text);
    }
}

/// `1,3,5`, `01-16`, `1-3,7`: the numbers, as text with their width.
fn range_list(inside: &str) -> Result<Vec<String>, String> {
    if inside.is_empty() {
        return Err("empty brackets".to_string());
    }
    let mut numbers = Vec::new();
    for part in inside.split(',') {
        let (first, last) = match part.split_once('-') {
            Some((first, last)) => (first, last),
            None => (part, part),
        };
        let start = number(first, part)?;
        let end = number(last, part)?;
        if end < start {
            return Err(format!("{part:?} runs backwards"));
        }
        let width = if first.len() > 1 && first.starts_with('0') {
            first.len()
        } else {
            0
        };
        let count = usize::try_from(end - start + 1).unwrap_or(usize::MAX);
        if numbers.len().saturating_add(count) > MAX_EXPANSION {
            return Err(format!("more than {MAX_EXPANSION} numbers"));
        }
        numbers.extend((start..=end).map(|n| format!("{n:0width$}")));
    }
    Ok(numbers)
}

/// One bound of a range.
fn number(text: &str, part: &str) -> Result<u64, String> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "{part:?} is not a number or a range of numbers (such as 1-16 or 01-16)"
        ));
    }
    text.parse()
        .map_err(|_| format!("{text:?} is too large a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(entry: &str) -> Vec<String> {
        expand(entry).unwrap_or_else(|err| panic!("{entry}: {err}"))
    }

    #[test]
    fn plain_names_stand_for_themselves() {
        assert_eq!(names("web1"), ["web1"]);
        assert_eq!(names("deploy@web1:2222"), ["deploy@web1:2222"]);
        assert_eq!(names("[::1]:2222"), ["[::1]:2222"]);
        assert_eq!(names("ops@[fe80::1]"), ["ops@[fe80::1]"]);
        assert!(!is_range("[::1]:22"));
        assert!(is_range("web[1-2]"));
    }

    #[test]
    fn ranges_lists_and_padding() {
        assert_eq!(names("web[1-3]"), ["web1", "web2", "web3"]);
        assert_eq!(names("web[08-11]"), ["web08", "web09", "web10", "web11"]);
        assert_eq!(names("db[1,3,5]"), ["db1", "db3", "db5"]);
        assert_eq!(names("n[1-2,7]x"), ["n1x", "n2x", "n7x"]);
        assert_eq!(
            names("deploy@web[1-2]:2222"),
            ["deploy@web1:2222", "deploy@web2:2222"]
        );
        assert_eq!(
            names("r[1-2]-n[1-2]"),
            ["r1-n1", "r1-n2", "r2-n1", "r2-n2"],
            "a product, the first group slowest"
        );
        assert_eq!(names("[1-2]"), ["1", "2"]);
    }

    #[test]
    fn bad_ranges_say_why() {
        let err = |entry: &str| expand(entry).expect_err(entry);
        assert!(err("web[]").contains("empty brackets"));
        assert!(
            err("web[a-c]").contains("not a number"),
            "{}",
            err("web[a-c]")
        );
        assert!(err("web[3-1]").contains("runs backwards"));
        assert!(err("web[1-]").contains("not a number"));
        assert!(err("web[1,,2]").contains("not a number"));
        assert!(err("web[1-99999999]").contains("more than 100000"));
        assert!(err("a[1-1000]b[1-1000]").contains("more than 100000"));
        assert!(err("w[x]").starts_with("invalid host range [x] in \"w[x]\""));
    }
}
