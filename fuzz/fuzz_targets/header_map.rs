//! The serialized header map Envoy hands the filter, decoded from arbitrary bytes.
//!
//! `wire::decode_pairs` must never panic, and a map it reads holds as many pairs as the
//! buffer declares, each name and value borrowed from inside the buffer, in layout order.
#![no_main]

use keygate::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = wire::decode_pairs(data) else {
        return;
    };
    let buf = data.as_ptr_range();
    let inside = |s: &[u8]| {
        let r = s.as_ptr_range();
        buf.start <= r.start && r.end <= buf.end
    };
    // Names and values follow the header table in order, so each starts after the
    // previous one ends.
    let mut after = data.as_ptr();
    for (name, value) in &pairs {
        assert!(inside(name.as_bytes()), "name {name:?} outside the buffer");
        assert!(inside(value), "value {value:?} outside the buffer");
        assert!(
            name.as_ptr() >= after,
            "name {name:?} overlaps what precedes it"
        );
        assert!(
            value.as_ptr() >= name.as_bytes().as_ptr_range().end,
            "value {value:?} overlaps its name {name:?}"
        );
        after = value.as_ptr_range().end;
    }
    if data.len() >= 4 {
        let count = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        assert_eq!(pairs.len(), count, "pairs declared and read differ");
    } else {
        assert!(data.is_empty() && pairs.is_empty());
    }
});
