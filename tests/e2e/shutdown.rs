//! SIGTERM: streams are told to reconnect, the process exits 0 promptly.

use changegate_e2e::Gateway;

#[tokio::test]
async fn sigterm_ends_streams_with_a_retry_hint_and_exits_cleanly() {
    let gw = Gateway::start(&["--retry", "750ms"]).await;
    let path = format!("/v1/events/subscribe?topic=t&apikey={}", gw.dev_key("anon"));
    let mut streams = vec![gw.sse(&path, &[]).await, gw.sse(&path, &[]).await];
    for sse in &mut streams {
        assert_eq!(sse.next_block().await.unwrap().raw, "retry: 750\n\n");
    }
    let status = gw.terminate().await;
    assert!(status.success(), "exit status {status:?}");
    for sse in &mut streams {
        assert_eq!(sse.next_block().await.unwrap().raw, "retry: 750\n\n");
        assert_eq!(sse.next_block().await, None, "the stream ended");
    }
}

#[tokio::test]
async fn after_sigterm_new_connections_are_refused() {
    let gw = Gateway::start(&[]).await;
    let url = gw.url("/healthz");
    let http = gw.http.clone();
    let status = gw.terminate().await;
    assert!(status.success());
    assert!(http.get(url).send().await.is_err(), "nothing listens any more");
}
