//! Request paths as upstreams read them, for route matching.
//!
//! Upstreams disagree about what a path means: servlet containers drop `;` parameters
//! from each segment (`/v1/admin;jsessionid=x` is `/v1/admin`), most frameworks decode
//! percent-escapes before routing (`/v1/%61dmin` is `/v1/admin`), Go's `net/http` and
//! others resolve dot segments and repeated slashes, some treat `\` as `/`, and Express
//! routes case-insensitively by default. A rule that restricts a prefix must hold for
//! every reading an upstream may choose, so keygate matches rules against each of a few
//! forms of the path (see [`Forms`]) and applies every rule any of them selects.
//!
//! A path keygate cannot read at all is refused, never matched as something else:
//! anything but a `/`-rooted origin form of visible ASCII (RFC 3986 has no raw bytes
//! above 0x7e, no spaces or controls, and no fragment in a request target), or one that
//! decodes to a control character (`%00` ends the path for C-string upstreams).

use std::borrow::Cow;

/// Why a path cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Empty, or not starting with `/` (`*`, absolute forms).
    NotOriginForm,
    /// A byte outside visible ASCII (controls, space, DEL, anything not UTF-8 ASCII), or `#`.
    ForbiddenByte(u8),
    /// A percent-escape that decodes to a control character or DEL.
    EncodedControl(u8),
    /// Once decoded, the path still holds an escape (`%2561` is `%61`): an upstream that
    /// decodes twice would read another path than keygate.
    DoubleEncoded,
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::NotOriginForm => f.write_str("path does not start with /"),
            PathError::ForbiddenByte(b) => write!(f, "path holds byte 0x{b:02x}"),
            PathError::EncodedControl(b) => write!(f, "path encodes control byte 0x{b:02x}"),
            PathError::DoubleEncoded => f.write_str("path is percent-encoded twice"),
        }
    }
}

/// The forms of one request path that rules are matched against (query string removed):
///
/// - `as_sent`: the path as the client wrote it (what an upstream that routes on the raw
///   path sees);
/// - `decoded`, with dot segments kept, and resolved: percent-escapes decoded once (`%2F`
///   included; a path that still holds an escape then is refused), cut at a decoded `?` or
///   `#`, `\` read as `/`, repeated slashes merged, `.` and `..` segments resolved (what
///   Flask, Express, FastAPI and Go route on, give or take);
/// - `without_params`: `decoded` with every segment's `;` parameters dropped (what
///   servlet containers route on).
///
/// Each is also matched case-insensitively against rules. Forms that are equal are held
/// once; for an ordinary path (`/v1/jobs/7`) all three are the path itself and nothing is
/// allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forms<'a> {
    forms: Vec<Cow<'a, [u8]>>,
}

impl<'a> Forms<'a> {
    /// The distinct forms, `as_sent` first.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.forms.iter().map(|f| f.as_ref())
    }

    /// The path as sent, without the query string.
    pub fn as_sent(&self) -> &[u8] {
        self.forms.first().map_or(b"/", |f| f.as_ref())
    }

    /// The most normalised form (`without_params`).
    pub fn normalised(&self) -> &[u8] {
        self.forms.last().map_or(b"/", |f| f.as_ref())
    }
}

/// The most forms `forms` returns (as sent, decoded with dots kept, resolved, without
/// parameters); `config::Matched` holds one selection per form and way of comparing.
pub const MAX_FORMS: usize = 4;

/// Reads `:path` (query string included) into the forms rules are matched against.
pub fn forms(raw: &[u8]) -> Result<Forms<'_>, PathError> {
    if raw.first() != Some(&b'/') {
        return Err(PathError::NotOriginForm);
    }
    if let Some(&b) = raw
        .iter()
        .find(|&&b| !(0x21..0x7f).contains(&b) || b == b'#')
    {
        return Err(PathError::ForbiddenByte(b));
    }
    let path = match raw.iter().position(|&b| b == b'?') {
        Some(i) => &raw[..i],
        None => raw,
    };
    if is_normal_form(path) {
        return Ok(Forms {
            forms: vec![Cow::Borrowed(path)],
        });
    }
    let mut decoded = percent_decode(path)?;
    // An upstream that decodes before it splits off the query string reads `%3F` (and
    // `%23`) as the end of the path: so does this form (only ever stricter).
    if let Some(end) = decoded.iter().position(|&b| b == b'?' || b == b'#') {
        decoded.truncate(end);
    }
    if holds_escape(&decoded) {
        return Err(PathError::DoubleEncoded);
    }
    // `%2F..%2F` resolved is one thing; an upstream that decodes `%2F` and then routes
    // without resolving dot segments reads it below the segment before: both are held.
    let decoded_unresolved = normalise(&decoded, false, false);
    let decoded = normalise(&decoded, false, true);
    let without_params = normalise(&decoded, true, true);
    let mut forms: Vec<Cow<'_, [u8]>> = vec![Cow::Borrowed(path)];
    for form in [decoded_unresolved, decoded, without_params] {
        if !forms.iter().any(|f| f.as_ref() == form.as_slice()) {
            forms.push(Cow::Owned(form));
        }
    }
    debug_assert!(forms.len() <= MAX_FORMS);
    Ok(Forms { forms })
}

/// Whether every upstream reads the path as written (it is its own normalised form): no
/// escapes, parameters, backslashes, repeated slashes or dot segments.
pub fn is_normal_form(path: &[u8]) -> bool {
    if path.iter().any(|&b| matches!(b, b'%' | b';' | b'\\')) {
        return false;
    }
    // `path` starts with `/`: its segments are what follows each slash.
    let last = path
        .iter()
        .filter(|&&b| b == b'/')
        .count()
        .saturating_sub(1);
    path.split(|&b| b == b'/')
        .skip(1)
        .enumerate()
        // An empty segment is fine only as the trailing one (`/v1/jobs/`, `/`).
        .all(|(i, seg)| (!seg.is_empty() || i == last) && seg != b"." && seg != b"..")
}

/// Decodes every valid `%XX` once; an invalid escape stays as written (upstreams that
/// reject it never serve it, the others read it literally).
fn percent_decode(path: &[u8]) -> Result<Vec<u8>, PathError> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        let b = path[i];
        if b == b'%' {
            let hi = path.get(i + 1).and_then(|&h| hex(h));
            let lo = path.get(i + 2).and_then(|&l| hex(l));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                let byte = hi << 4 | lo;
                if byte < 0x20 || byte == 0x7f {
                    return Err(PathError::EncodedControl(byte));
                }
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(b);
        i += 1;
    }
    Ok(out)
}

/// Whether `bytes` hold a valid `%XX` escape.
fn holds_escape(bytes: &[u8]) -> bool {
    bytes
        .windows(3)
        .any(|w| w[0] == b'%' && hex(w[1]).is_some() && hex(w[2]).is_some())
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `\` as `/`, repeated slashes merged, dot segments resolved (never above the root),
/// and with `drop_params` each segment cut at its first `;`. Keeps a trailing slash.
fn normalise(path: &[u8], drop_params: bool, resolve_dots: bool) -> Vec<u8> {
    let slashed: Vec<u8> = path
        .iter()
        .map(|&b| if b == b'\\' { b'/' } else { b })
        .collect();
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing_slash = false;
    for seg in slashed.split(|&b| b == b'/').skip(1) {
        let seg = if drop_params {
            seg.split(|&b| b == b';').next().unwrap_or(seg)
        } else {
            seg
        };
        trailing_slash = false;
        match seg {
            b"" => trailing_slash = true,
            b"." if resolve_dots => trailing_slash = true,
            b".." if resolve_dots => {
                segments.pop();
                trailing_slash = true;
            }
            s => segments.push(s),
        }
    }
    let mut out = Vec::with_capacity(slashed.len());
    for seg in &segments {
        out.push(b'/');
        out.extend_from_slice(seg);
    }
    if out.is_empty() || trailing_slash {
        out.push(b'/');
    }
    out
}

/// Whether `prefix` covers `path` segment-wise (see `config::Route::matches`), comparing
/// bytes exactly or ignoring ASCII case.
pub fn prefix_covers(prefix: &[u8], path: &[u8], ignore_case: bool) -> bool {
    let Some(head) = path.get(..prefix.len()) else {
        return false;
    };
    let same = if ignore_case {
        head.eq_ignore_ascii_case(prefix)
    } else {
        head == prefix
    };
    same && {
        let rest = &path[prefix.len()..];
        prefix.ends_with(b"/") || rest.is_empty() || rest.starts_with(b"/")
    }
}

/// Whether `method` is an HTTP token (RFC 9110 `tchar`s, at least one).
pub fn is_method_token(method: &[u8]) -> bool {
    !method.is_empty()
        && method
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

#[cfg(test)]
mod tests;
