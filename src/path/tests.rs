use super::*;

fn all(path: &str) -> Vec<String> {
    forms(path.as_bytes())
        .unwrap()
        .iter()
        .map(|f| String::from_utf8(f.to_vec()).unwrap())
        .collect()
}

#[test]
fn plain_paths_are_one_borrowed_form() {
    for p in ["/", "/v1/jobs", "/v1/jobs/", "/v1/Jobs/7", "/a-b_c.d~e/f"] {
        let f = forms(p.as_bytes()).unwrap();
        assert_eq!(f.iter().count(), 1, "{p}");
        assert!(matches!(f.forms[0], Cow::Borrowed(_)));
        assert_eq!(f.as_sent(), p.as_bytes());
    }
    assert_eq!(all("/v1/jobs?x=1;y=%2e"), ["/v1/jobs"]);
}

#[test]
fn forms_of_tricky_paths() {
    assert_eq!(
        all("/v1/admin;jsessionid=x"),
        ["/v1/admin;jsessionid=x", "/v1/admin"]
    );
    assert_eq!(all("/v1;x=1/admin"), ["/v1;x=1/admin", "/v1/admin"]);
    assert_eq!(all("/v1/%61dmin"), ["/v1/%61dmin", "/v1/admin"]);
    assert_eq!(all("/v1%2Fadmin"), ["/v1%2Fadmin", "/v1/admin"]);
    assert_eq!(all("/v1\\admin"), ["/v1\\admin", "/v1/admin"]);
    assert_eq!(all("/v1//admin/"), ["/v1//admin/", "/v1/admin/"]);
    assert_eq!(all("/v1/./x/../admin"), ["/v1/./x/../admin", "/v1/admin"]);
    assert_eq!(all("/../../admin"), ["/../../admin", "/admin"]);
    assert_eq!(all("/v1/x/..;/admin"), ["/v1/x/..;/admin", "/v1/admin"]);
    assert_eq!(
        all("/v1/admin%3bx"),
        ["/v1/admin%3bx", "/v1/admin;x", "/v1/admin"]
    );
    assert_eq!(all("/v1/%zz"), ["/v1/%zz"]);
    assert_eq!(
        all("/v1/admin%2f..%2fjobs"),
        ["/v1/admin%2f..%2fjobs", "/v1/admin/../jobs", "/v1/jobs"]
    );
    assert_eq!(all("/v1/admin%3Fx"), ["/v1/admin%3Fx", "/v1/admin"]);
    assert_eq!(all("/v1/admin%23/x"), ["/v1/admin%23/x", "/v1/admin"]);
    assert_eq!(all("/%2e%2e"), ["/%2e%2e", "/..", "/"]);
}

#[test]
fn unreadable_paths() {
    assert_eq!(forms(b""), Err(PathError::NotOriginForm));
    assert_eq!(forms(b"*"), Err(PathError::NotOriginForm));
    assert_eq!(forms(b"http://h/"), Err(PathError::NotOriginForm));
    assert_eq!(forms(b"/a b"), Err(PathError::ForbiddenByte(b' ')));
    assert_eq!(forms(b"/a?\xff"), Err(PathError::ForbiddenByte(0xff)));
    assert_eq!(forms(b"/a#b"), Err(PathError::ForbiddenByte(b'#')));
    assert_eq!(forms(b"/a%00"), Err(PathError::EncodedControl(0)));
    assert_eq!(forms(b"/a%7F"), Err(PathError::EncodedControl(0x7f)));
    assert_eq!(forms(b"/v1/%2561dmin"), Err(PathError::DoubleEncoded));
    assert_eq!(forms(b"/v1/%%361dmin"), Err(PathError::DoubleEncoded));
    assert_eq!(forms(b"/100%25/x"), Ok(forms(b"/100%25/x").unwrap()));
    // A control escape in the query string is the query's business.
    assert!(forms(b"/a?x=%00").is_ok());
}

#[test]
fn prefixes_cover_whole_segments() {
    assert!(prefix_covers(b"/v1/admin", b"/v1/admin", false));
    assert!(prefix_covers(b"/v1/admin", b"/v1/admin/x", false));
    assert!(!prefix_covers(b"/v1/admin", b"/v1/administrator", false));
    assert!(!prefix_covers(b"/v1/admin", b"/v1/ADMIN", false));
    assert!(prefix_covers(b"/v1/admin", b"/v1/ADMIN", true));
    assert!(prefix_covers(b"/", b"/anything", false));
    assert!(prefix_covers(b"/static/", b"/static/x", false));
    assert!(!prefix_covers(b"/static/", b"/static", false));
}

#[test]
fn methods_are_tokens() {
    for m in ["GET", "POST", "M-SEARCH", "get", "X_CUSTOM"] {
        assert!(is_method_token(m.as_bytes()), "{m}");
    }
    for m in [&b""[..], b"GE T", b"GET\0", b"\xff", b"(", b"GET/"] {
        assert!(!is_method_token(m), "{m:?}");
    }
}

#[test]
fn normal_forms() {
    for p in ["/", "/v1", "/v1/", "/v1/admin"] {
        assert!(is_normal_form(p.as_bytes()), "{p}");
    }
    for p in [
        "/v1//admin",
        "/v1/./a",
        "/v1/..",
        "/a;b",
        "/a%41",
        "/a\\b",
        "//",
    ] {
        assert!(!is_normal_form(p.as_bytes()), "{p}");
    }
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The normalised form is its own normalised form, and it is one of the forms.
        #[test]
        fn normalising_is_idempotent(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let path = [b"/".as_slice(), &bytes].concat();
            if let Ok(f) = forms(&path) {
                let n = f.normalised().to_vec();
                prop_assert!(n.starts_with(b"/"));
                prop_assert!(!n.contains(&b'?'));
                let again = forms(&n);
                // A decoded byte above 0x7e or a space is not a valid raw path byte, so
                // only readable normalised forms are checked.
                // (Decoding is done once: a normalised form that still holds `%`, from
                // `%25`, would decode again.)
                if let (Ok(again), false) = (again, n.contains(&b'%')) {
                    prop_assert_eq!(again.normalised(), n.as_slice());
                }
                let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
                prop_assert_eq!(f.as_sent(), &path[..end]);
            }
        }
    }
}
