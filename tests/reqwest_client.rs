//! The default HTTP transport against a raw loopback server: it never follows redirects, it
//! gives up after its time-out, and it refuses oversized answers.
#![cfg(feature = "reqwest")]

use std::time::Duration;

use tokenbroker::http::{HttpClient, HttpErrorKind, MAX_RESPONSE_BYTES, ReqwestClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Serves one canned answer (or none, if `answer` is `None`) to each connection.
async fn serve(answer: Option<Vec<u8>>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                match answer {
                    Some(a) => {
                        let _ = sock.write_all(&a).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            });
        }
    });
    format!("http://{addr}/token")
}

fn post(url: &str) -> http::Request<Vec<u8>> {
    http::Request::post(url)
        .body(b"grant_type=refresh_token".to_vec())
        .unwrap()
}

#[tokio::test]
async fn redirects_are_returned_not_followed() {
    let url = serve(Some(
        b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:9/steal\r\nContent-Length: 0\r\n\r\n"
            .to_vec(),
    ))
    .await;
    let response = ReqwestClient::new()
        .unwrap()
        .execute(post(&url))
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
}

#[tokio::test]
async fn a_silent_server_is_a_timeout() {
    let url = serve(None).await;
    let client = ReqwestClient::with_timeout(Duration::from_millis(200)).unwrap();
    let err = client.execute(post(&url)).await.unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Timeout);
}

#[tokio::test]
async fn a_refused_connection_is_a_connect_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/token", listener.local_addr().unwrap());
    drop(listener);
    let err = ReqwestClient::new()
        .unwrap()
        .execute(post(&url))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::Connect);
}

#[tokio::test]
async fn an_oversized_answer_is_refused() {
    let body = vec![b'x'; MAX_RESPONSE_BYTES + 10];
    let mut answer =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
    answer.extend_from_slice(&body);
    let url = serve(Some(answer)).await;
    let err = ReqwestClient::new()
        .unwrap()
        .execute(post(&url))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), HttpErrorKind::TooLarge);
}
