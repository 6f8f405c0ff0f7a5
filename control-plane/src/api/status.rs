//! The domain's errors as gRPC statuses: registry errors (field paths as in
//! the request), CA errors, for the admin API and the Identity service. Every
//! message is bounded ([`meshwire_mesh::grpc::MAX_MESSAGE`]): errors echo
//! what the caller sent.

use std::sync::Arc;

use meshwire_mesh::ModelError;
use tonic::{Code, Status};

use crate::ca::{Ca, CaError};
use crate::registry::RegistryError;
use crate::store::StoreError;

/// A status whose message is cut to [`meshwire_mesh::grpc::MAX_MESSAGE`].
pub(crate) fn bounded(code: Code, msg: impl std::fmt::Display) -> Status {
    let msg = msg.to_string();
    Status::new(
        code,
        meshwire_mesh::grpc::truncate(&msg, meshwire_mesh::grpc::MAX_MESSAGE),
    )
}

pub(super) fn invalid(e: ModelError) -> Status {
    bounded(Code::InvalidArgument, e)
}

pub(super) fn required(field: &str) -> Status {
    invalid(ModelError::new(field, "is required"))
}

/// The model names the bias `lb.active_request_bias`; the API has it flat.
pub(super) fn api_field(mut e: ModelError) -> ModelError {
    if e.field == "lb.active_request_bias" {
        e.field = "active_request_bias".into();
    }
    if e.field == "lb.balance_factor" {
        e.field = "hash_balance_factor".into();
    }
    if e.field == "zones.min_healthy" {
        e.field = "zone_min_healthy".into();
    }
    e
}

/// Maps a registry error; `within` prefixes field paths of invalid values
/// (`service`, `endpoint` or nothing).
pub(super) fn status(e: RegistryError, within: &str) -> Status {
    match e {
        RegistryError::ServiceNotFound(_) | RegistryError::EndpointNotFound { .. } => {
            bounded(Code::NotFound, e)
        }
        RegistryError::ServiceExists(_) | RegistryError::EndpointExists { .. } => {
            bounded(Code::AlreadyExists, e)
        }
        RegistryError::TooManyEndpoints { .. } => bounded(Code::FailedPrecondition, e),
        RegistryError::Invalid(m) => {
            let m = api_field(m);
            invalid(if within.is_empty() {
                m
            } else {
                m.within(within)
            })
        }
        RegistryError::Store(StoreError::Closed) => {
            Status::unavailable("the control plane is shutting down; nothing was changed")
        }
        RegistryError::Store(s @ StoreError::Unavailable { .. }) => {
            bounded(Code::Unavailable, format!("{s}; nothing was changed"))
        }
        RegistryError::Store(s @ StoreError::Unconfirmed { .. }) => {
            bounded(Code::Unavailable, s.to_string())
        }
        RegistryError::Store(s @ StoreError::Conflict { .. }) => {
            bounded(Code::Aborted, format!("{s}; nothing was changed, retry"))
        }
        RegistryError::Store(s) => {
            bounded(Code::Internal, format!("store: {s}; nothing was changed"))
        }
    }
}

/// A CA error as the caller should see it: its own mistakes (a bad token or
/// CSR, an unknown root) by their codes, the rest as INTERNAL.
pub(crate) fn ca_error(e: CaError) -> Status {
    let code = match &e {
        CaError::BadToken => Code::Unauthenticated,
        CaError::BadCsr(_) | CaError::InvalidArgument(_) | CaError::AmbiguousRoot(_) => {
            Code::InvalidArgument
        }
        CaError::UnknownRoot(_) => Code::NotFound,
        CaError::FailedPrecondition(_) => Code::FailedPrecondition,
        CaError::PermissionDenied(_) => Code::PermissionDenied,
        CaError::File { .. } | CaError::Identity(_) | CaError::Rcgen(_) | CaError::Task(_) => {
            Code::Internal
        }
        CaError::Store(
            StoreError::Unavailable { .. } | StoreError::Unconfirmed { .. } | StoreError::Closed,
        ) => Code::Unavailable,
        CaError::Store(StoreError::NotLeader) => Code::FailedPrecondition,
        CaError::Store(_) => Code::Internal,
    };
    bounded(code, e)
}

/// Runs a CA operation off the async workers ([`crate::ca::blocking`]), its
/// error as a gRPC status.
pub(crate) async fn ca_call<T: Send + 'static>(
    ca: &Arc<Ca>,
    f: impl FnOnce(&Ca) -> Result<T, CaError> + Send + 'static,
) -> Result<T, Status> {
    crate::ca::blocking(ca, f).await.map_err(ca_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_become_grpc_codes() {
        let s = status(RegistryError::ServiceNotFound("x".into()), "");
        assert_eq!(s.code(), Code::NotFound);
        let s = status(RegistryError::ServiceExists("x".into()), "");
        assert_eq!(s.code(), Code::AlreadyExists);
        let s = status(
            RegistryError::Invalid(ModelError::new("lb.active_request_bias", "bad")),
            "service",
        );
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "service.active_request_bias: bad")
        );
        let s = status(RegistryError::Store(StoreError::Closed), "");
        assert_eq!(s.code(), Code::Unavailable);
    }

    #[test]
    fn messages_are_bounded() {
        let long = "x".repeat(100_000);
        let s = status(RegistryError::ServiceNotFound(long), "");
        assert_eq!(s.message().len(), meshwire_mesh::grpc::MAX_MESSAGE);
        assert!(s.message().ends_with("..."));
    }

    #[test]
    fn ca_errors_become_grpc_codes() {
        let code = |e: CaError| ca_error(e).code();
        assert_eq!(code(CaError::BadToken), Code::Unauthenticated);
        assert_eq!(code(CaError::BadCsr("x".into())), Code::InvalidArgument);
        assert_eq!(
            code(CaError::AmbiguousRoot("ab".into())),
            Code::InvalidArgument
        );
        assert_eq!(code(CaError::UnknownRoot("ab".into())), Code::NotFound);
        assert_eq!(
            code(CaError::FailedPrecondition("x".into())),
            Code::FailedPrecondition
        );
        assert_eq!(code(CaError::Rcgen("x".into())), Code::Internal);
        let down = ca_error(CaError::Store(StoreError::Unavailable {
            endpoints: "http://e:2379".into(),
            reason: "refused".into(),
        }));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(down.message().contains("etcd"), "{down:?}");
    }
}
