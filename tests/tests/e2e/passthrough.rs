//! Everything gRPC can do passes through a sidecar pair unchanged:
//! unary and the three streaming shapes, metadata (text and `-bin`) both
//! ways, trailers, status codes and messages, 16 MiB messages.

use futures_util::StreamExt;
use meshwire_tests::*;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::{Code, Request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unary_with_metadata_both_ways() {
    let mesh = Mesh::new(1).await;
    let mut client = mesh.client().await;

    let mut req = Request::new(EchoRequest {
        payload: b"hello".to_vec(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-echo-text", MetadataValue::from_static("plain value"));
    req.metadata_mut().insert_bin(
        "x-echo-data-bin",
        BinaryMetadataValue::from_bytes(&[0, 1, 2, 255, 254]),
    );
    let resp = client.echo(req).await.expect("echo through the mesh");
    assert_eq!(resp.metadata().get("x-echo-text").unwrap(), "plain value");
    assert_eq!(
        resp.metadata()
            .get_bin("x-echo-data-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &[0u8, 1, 2, 255, 254][..]
    );
    let reply = resp.into_inner();
    assert_eq!(reply.payload, b"hello");
    assert_eq!(reply.server, "echo-0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_message_and_custom_trailers_pass_through() {
    let mesh = Mesh::new(1).await;
    let mut client = mesh.client().await;
    let mut req = Request::new(EchoRequest {
        fail_code: Code::FailedPrecondition as i32,
        fail_message: "no such thing: ünïcödé \t 100%".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-echo-reason", MetadataValue::from_static("because"));
    req.metadata_mut().insert_bin(
        "x-echo-detail-bin",
        BinaryMetadataValue::from_bytes(b"\x00\xff"),
    );
    let status = client.echo(req).await.expect_err("app error");
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), "no such thing: ünïcödé \t 100%");
    assert_eq!(status.metadata().get("x-echo-reason").unwrap(), "because");
    assert_eq!(
        status
            .metadata()
            .get_bin("x-echo-detail-bin")
            .unwrap()
            .to_bytes()
            .unwrap(),
        &b"\x00\xff"[..]
    );
    assert!(
        status.metadata().get("meshwire-error").is_none(),
        "an app error is not a sidecar error"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_client_and_bidi_streaming() {
    let mesh = Mesh::new(1).await;
    let mut client = mesh.client().await;

    // Server streaming.
    let mut s = client
        .server_stream(StreamRequest {
            count: 50,
            size: 1000,
            interval_ms: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(m) = s.next().await {
        let m = m.unwrap();
        assert_eq!(m.payload.len(), 1000);
        seqs.push(m.seq);
    }
    assert_eq!(seqs, (0..50).collect::<Vec<_>>());

    // Client streaming.
    let msgs = (0..40).map(|i| EchoRequest {
        payload: vec![i as u8; 777],
        ..Default::default()
    });
    let reply = client
        .client_stream(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.received_bytes, 40 * 777);
    assert_eq!(reply.seq, 40);

    // Bidi: interleaved, one reply per request, in order.
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut replies = client
        .bidi_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..30u32 {
        tx.send(EchoRequest {
            payload: i.to_be_bytes().to_vec(),
            ..Default::default()
        })
        .await
        .unwrap();
        let r = replies.next().await.unwrap().unwrap();
        assert_eq!(r.payload, i.to_be_bytes());
        assert_eq!(r.seq, i);
    }
    // An error mid-stream arrives as the stream's status.
    tx.send(EchoRequest {
        fail_code: Code::Aborted as i32,
        fail_message: "stop".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let err = replies.next().await.unwrap().unwrap_err();
    assert_eq!(err.code(), Code::Aborted);
    assert_eq!(err.message(), "stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_mib_messages_both_ways() {
    let mesh = Mesh::new(1).await;
    let mut client = mesh.client().await;
    let big: Vec<u8> = (0..16 << 20).map(|i: u32| (i % 251) as u8).collect();
    let reply = client
        .echo(EchoRequest {
            payload: big.clone(),
            ..Default::default()
        })
        .await
        .expect("16 MiB round trip")
        .into_inner();
    assert_eq!(reply.payload.len(), big.len());
    assert!(reply.payload == big, "payload corrupted");

    let reply = client
        .echo(EchoRequest {
            response_size: 20 << 20,
            ..Default::default()
        })
        .await
        .expect("20 MiB response")
        .into_inner();
    assert_eq!(reply.payload.len(), 20 << 20);
}
