//! xDS resources as a sidecar receives them: bytes → Envoy `Cluster` or
//! `ClusterLoadAssignment` → the validated model (the xDS client's own
//! conversion, `meshwire_xds::resources::decode_*`). Never panics; what it
//! accepts is valid; its errors are bounded (they go into NACKs).
//!
//! Run with `scripts/fuzz.sh 60 xds_resources`.

#![no_main]

use envoy_types::pb::google::protobuf::Any;
use libfuzzer_sys::fuzz_target;
use meshwire_xds::resources::{CLUSTER, ENDPOINT, decode_cla, decode_cluster};

/// Longest error text: a bounded name, field and reason.
const MAX_ERROR: usize = 3 * meshwire_mesh::grpc::MAX_MESSAGE;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the resource type, the rest is its encoding.
    let Some((&kind, value)) = data.split_first() else {
        return;
    };
    let value = value.to_vec();
    if kind % 2 == 0 {
        let any = Any {
            type_url: CLUSTER.into(),
            value,
        };
        match decode_cluster(&any) {
            Ok(c) => c.validate().expect("a decoded cluster is valid"),
            Err(e) => assert!(e.to_string().len() <= MAX_ERROR, "{e}"),
        }
    } else {
        let any = Any {
            type_url: ENDPOINT.into(),
            value,
        };
        match decode_cla(&any) {
            Ok((_, endpoints)) => {
                for e in endpoints {
                    e.validate().expect("a decoded endpoint is valid");
                }
            }
            Err(e) => assert!(e.to_string().len() <= MAX_ERROR, "{e}"),
        }
    }
});
