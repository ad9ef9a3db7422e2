//! The comet's real TCP frame reader (`TcpTransport::read_frame`, the code
//! every TCP client's bytes go through), fed arbitrary bytes in arbitrary
//! read sizes. It may not panic, and it must agree with `decode_stream`
//! (the codec the other targets fuzz) on every input, however it is split:
//! the same frames, an error exactly where the codec refuses, and an error
//! for input that ends inside a frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use pushcluster_api::protocol::decode_stream;

fuzz_target!(|data: &[u8]| {
    // The first byte says how many of the next bytes are read sizes.
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let count = usize::from(count % 8).min(rest.len());
    let (chunks, stream) = rest.split_at(count);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let (frames, error) =
        runtime.block_on(pushcluster_comet::read_tcp_frames(stream, chunks));

    let mut buf = BytesMut::from(stream);
    let mut expected = Vec::new();
    let refused = loop {
        match decode_stream(&mut buf) {
            Ok(Some(frame)) => expected.push(frame),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert_eq!(frames, expected, "the same frames as decode_stream");
    let ended_mid_frame = !refused && !buf.is_empty();
    assert_eq!(
        error.is_some(),
        refused || ended_mid_frame,
        "an error exactly when decode_stream refuses or the input ends mid-frame: {error:?}"
    );
});
