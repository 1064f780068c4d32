//! The frame decoder on any bytes: never a panic; a decoded message uses no more bytes
//! than it was given, and encodes back to a frame that decodes to the same message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pushbroker::protocol::{MAX_FRAME_BODY, decode_message, encode_frame};

fuzz_target!(|data: &[u8]| {
    let Ok((msg, used)) = decode_message(data, MAX_FRAME_BODY) else {
        return;
    };
    assert!(used <= data.len(), "used {used} of {}", data.len());
    let mut frame = Vec::new();
    if encode_frame(&mut frame, &msg).is_ok() {
        let (again, again_used) =
            decode_message(&frame, MAX_FRAME_BODY).expect("an encoded message decodes");
        assert_eq!(again_used, frame.len());
        assert_eq!(format!("{again:?}"), format!("{msg:?}"));
    }
});
