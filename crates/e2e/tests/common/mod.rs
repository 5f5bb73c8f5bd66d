//! Config shared by the end-to-end tests.
#![allow(dead_code)]

pub mod certs;

use tandem_e2e::{service_yaml, split_yaml};

/// client -> web; client -> catalog (split over catalog-v1 / catalog-v2);
/// h2svc (HTTP/2), grpc-echo (gRPC), tcpecho (opaque TCP).
pub fn config() -> String {
    config_with_split(90, 10)
}

pub fn config_with_split(v1: u32, v2: u32) -> String {
    let mut s = String::new();
    for (name, proto) in [
        ("client", "http"),
        ("web", "http"),
        ("catalog", "http"),
        ("catalog-v1", "http"),
        ("catalog-v2", "http"),
        ("h2svc", "http2"),
        ("grpc-echo", "grpc"),
        ("tcpecho", "tcp"),
        ("lonely", "http"),
    ] {
        s.push_str(&service_yaml(name, proto));
    }
    s.push_str(&split_yaml(
        "catalog",
        &[("catalog-v1", v1), ("catalog-v2", v2)],
    ));
    s
}

/// An `orders` Service, for tests that need a second hop.
pub fn orders_service() -> String {
    tandem_e2e::service_yaml("orders", "http")
}
