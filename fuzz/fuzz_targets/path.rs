//! `:path` as sent by the client, read into the forms route rules are matched against.
//!
//! `path::forms` must never panic. When it reads a path:
//! - every form starts with `/` and holds no `?` (the query string is not part of it);
//! - the first form is the input up to the first `?`, and no form is held twice;
//! - normalising is idempotent: the normalised form reads again, to itself (unless it
//!   holds a decoded space or non-ASCII byte, which only an escape can carry).
//!
//! An error is a refusal, which is fine.
#![no_main]

use keygate::path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let forms = match path::forms(data) {
        Ok(forms) => forms,
        Err(e) => {
            // Refusing is fine; the message must still render.
            let _ = e.to_string();
            return;
        }
    };
    let sent = data.split(|&b| b == b'?').next().unwrap_or(data);
    let all: Vec<&[u8]> = forms.iter().collect();
    assert_eq!(
        all.first().copied(),
        Some(sent),
        "the first form of {:?} is not the path as sent",
        show(data)
    );
    assert_eq!(forms.as_sent(), sent);
    for (i, form) in all.iter().enumerate() {
        assert!(
            form.first() == Some(&b'/'),
            "form {:?} of {:?} does not start with /",
            show(form),
            show(data)
        );
        assert!(
            !form.contains(&b'?'),
            "form {:?} of {:?} holds a ?",
            show(form),
            show(data)
        );
        assert!(
            !all[..i].contains(form),
            "form {:?} of {:?} is held twice",
            show(form),
            show(data)
        );
    }
    let normalised = forms.normalised();
    assert_eq!(all.last().copied(), Some(normalised));
    let again = match path::forms(normalised) {
        Ok(again) => again,
        // A decoded space or byte above 0x7e is only valid escaped in a request line: the
        // normalised form holds it raw, so it cannot be sent as it is. Fine.
        Err(path::PathError::ForbiddenByte(b)) if b == b' ' || b >= 0x7f => return,
        Err(e) => panic!(
            "the normalised form {:?} of {:?} does not read again: {e}",
            show(normalised),
            show(data)
        ),
    };
    assert!(
        again.normalised() == normalised,
        "normalising is not idempotent: {:?} -> {:?} -> {:?}",
        show(data),
        show(normalised),
        show(again.normalised())
    );
});

fn show(bytes: &[u8]) -> String {
    bytes.escape_ascii().to_string()
}
