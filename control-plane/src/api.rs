//! The admin gRPC API (`meshwire.admin.v1.MeshAdmin`, see
//! `proto/meshwire/admin/v1/admin.proto`): each request is checked
//! (`INVALID_ARGUMENT` naming the field by its path in the request), turned
//! into one [`Registry`] call, and answered once its change is committed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::admin::v1::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use meshwire_xds::{Cluster, Endpoint, LbPolicy, ModelError, Snapshot};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::auth::RequireToken;
use crate::nodes::{NodeRegistry, NodeStatus};
use crate::registry::{
    EndpointPatch, Event, LbKind, Registry, RegistryError, ServiceInfo, ServicePatch,
    check_service_name,
};
use crate::store::{Change, StoreError};

/// Limits on free-form endpoint fields, so one call cannot bloat every snapshot.
const MAX_LABEL: usize = 253;
const MAX_METADATA_ENTRIES: usize = 64;
const MAX_METADATA_VALUE: usize = 4096;
const MAX_IDENTITY: usize = 2048;

/// The fields `UpdateService` can change.
const UPDATABLE: &str =
    "lb_policy, active_request_bias, connect_timeout, request_timeout, authority";

pub type AdminService = InterceptedService<MeshAdminServer<AdminApi>, RequireToken>;

/// The admin API over a [`Registry`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    registry: Arc<Registry>,
    nodes: Arc<NodeRegistry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
}

impl AdminApi {
    /// `snapshots` is what xDS serves (for `Status`); `shutdown` ends `Watch`
    /// streams so a graceful stop is not held up by them.
    pub fn new(
        registry: Arc<Registry>,
        nodes: Arc<NodeRegistry>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            registry,
            nodes,
            snapshots,
            shutdown,
        }
    }

    /// The gRPC service, behind the bearer-token check.
    pub fn into_service(self, token: &str) -> AdminService {
        MeshAdminServer::with_interceptor(self, RequireToken::new(token))
    }
}

// === errors ===

fn invalid(e: ModelError) -> Status {
    Status::invalid_argument(e.to_string())
}

fn required(field: &str) -> Status {
    invalid(ModelError::new(field, "is required"))
}

/// The model names the bias `lb.active_request_bias`; the API has it flat.
fn api_field(mut e: ModelError) -> ModelError {
    if e.field == "lb.active_request_bias" {
        e.field = "active_request_bias".into();
    }
    e
}

/// Maps a registry error; `within` prefixes field paths of invalid values
/// (`service`, `endpoint` or nothing).
fn status(e: RegistryError, within: &str) -> Status {
    match e {
        RegistryError::ServiceNotFound(_) | RegistryError::EndpointNotFound { .. } => {
            Status::not_found(e.to_string())
        }
        RegistryError::ServiceExists(_) | RegistryError::EndpointExists { .. } => {
            Status::already_exists(e.to_string())
        }
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
        RegistryError::Store(s) => Status::internal(format!("store: {s}; nothing was changed")),
    }
}

// === requests → model ===

fn service_name(field: &str, name: &str) -> Result<(), Status> {
    check_service_name(field, name).map_err(invalid)
}

fn address(field: &str, s: &str) -> Result<SocketAddr, Status> {
    s.parse::<SocketAddr>().map_err(|_| {
        invalid(ModelError::new(
            field,
            format!("{s:?} is not an ip:port address (e.g. 10.0.0.7:15006 or [fd00::7]:15006)"),
        ))
    })
}

fn lb_kind(value: i32) -> Result<Option<LbKind>, ModelError> {
    match pb::LbPolicy::try_from(value) {
        Ok(pb::LbPolicy::Unspecified) => Ok(None),
        Ok(pb::LbPolicy::LeastRequest) => Ok(Some(LbKind::LeastRequest)),
        Ok(pb::LbPolicy::RoundRobin) => Ok(Some(LbKind::RoundRobin)),
        Err(_) => Err(ModelError::new(
            "lb_policy",
            format!("unknown value {value}; use LB_POLICY_LEAST_REQUEST or LB_POLICY_ROUND_ROBIN"),
        )),
    }
}

fn duration(
    field: &str,
    d: Option<&prost_types::Duration>,
) -> Result<Option<Duration>, ModelError> {
    d.map(|d| {
        Duration::try_from(*d)
            .map_err(|_| ModelError::new(field, format!("{d} is not a non-negative duration")))
    })
    .transpose()
}

fn authority(a: Option<&String>) -> Result<Option<String>, ModelError> {
    match a {
        Some(a) if a.is_empty() => Err(ModelError::new(
            "authority",
            "must not be empty (leave it unset for none)",
        )),
        a => Ok(a.cloned()),
    }
}

/// A new service from a request (validated whole by the registry).
fn new_service(s: &pb::Service) -> Result<Cluster, ModelError> {
    let mut c = Cluster::new(&s.name);
    let patch = ServicePatch {
        lb_policy: Some(lb_kind(s.lb_policy)?.unwrap_or(LbKind::LeastRequest)),
        active_request_bias: Some(s.active_request_bias),
        connect_timeout: duration("connect_timeout", s.connect_timeout.as_ref())?,
        request_timeout: Some(duration("request_timeout", s.request_timeout.as_ref())?),
        authority: Some(authority(s.authority.as_ref())?),
    };
    patch.apply(&mut c)?;
    c.validate().map_err(api_field)?;
    Ok(c)
}

/// The fields named in `paths`, from `s`; a named field left unset goes back
/// to its default. Errors are paths in the request.
fn service_patch(s: &pb::Service, paths: &[String]) -> Result<ServicePatch, ModelError> {
    if paths.is_empty() {
        return Err(ModelError::new(
            "update_mask",
            format!("must name at least one field ({UPDATABLE})"),
        ));
    }
    let mut patch = ServicePatch::default();
    for (i, p) in paths.iter().enumerate() {
        let in_service = |e: ModelError| e.within("service");
        match p.strip_prefix("service.").unwrap_or(p) {
            "lb_policy" => {
                patch.lb_policy = Some(
                    lb_kind(s.lb_policy)
                        .map_err(in_service)?
                        .unwrap_or(LbKind::LeastRequest),
                );
            }
            "active_request_bias" => patch.active_request_bias = Some(s.active_request_bias),
            "connect_timeout" => {
                patch.connect_timeout = Some(
                    duration("connect_timeout", s.connect_timeout.as_ref())
                        .map_err(in_service)?
                        .unwrap_or(Cluster::DEFAULT_CONNECT_TIMEOUT),
                );
            }
            "request_timeout" => {
                patch.request_timeout = Some(
                    duration("request_timeout", s.request_timeout.as_ref()).map_err(in_service)?,
                );
            }
            "authority" => {
                patch.authority = Some(authority(s.authority.as_ref()).map_err(in_service)?);
            }
            "name" => {
                return Err(ModelError::new(
                    format!("update_mask.paths[{i}]"),
                    "a service cannot be renamed (create the new one, then delete this one)",
                ));
            }
            other => {
                return Err(ModelError::new(
                    format!("update_mask.paths[{i}]"),
                    format!("unknown field {other:?}; use {UPDATABLE}"),
                ));
            }
        }
    }
    Ok(patch)
}

/// Free text that ends up in snapshots: bounded, no control characters.
fn text(field: &str, s: &str, max: usize) -> Result<(), ModelError> {
    if s.len() > max {
        return Err(ModelError::new(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if s.chars().any(char::is_control) {
        return Err(ModelError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// A new endpoint from a request (field paths relative to the endpoint).
fn new_endpoint(e: &pb::Endpoint) -> Result<Endpoint, Status> {
    let addr = address("endpoint.address", &e.address)?;
    let check = || -> Result<Endpoint, ModelError> {
        let mut ep = Endpoint::new(addr).with_weight(e.weight.unwrap_or(1));
        ep.draining = e.draining;
        if !e.zone.is_empty() {
            text("zone", &e.zone, MAX_LABEL)?;
            ep.zone = Some(e.zone.clone());
        }
        if let Some(id) = &e.identity {
            if id.is_empty() {
                return Err(ModelError::new(
                    "identity",
                    "must not be empty (leave it unset for none)",
                ));
            }
            if id.chars().any(char::is_whitespace) {
                return Err(ModelError::new("identity", "must not contain whitespace"));
            }
            text("identity", id, MAX_IDENTITY)?;
            ep.identity = Some(id.clone());
        }
        if e.metadata.len() > MAX_METADATA_ENTRIES {
            return Err(ModelError::new(
                "metadata",
                format!(
                    "at most {MAX_METADATA_ENTRIES} entries, got {}",
                    e.metadata.len()
                ),
            ));
        }
        let metadata: BTreeMap<String, String> = e
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (k, v) in &metadata {
            let field = format!("metadata[{k:?}]");
            if k.is_empty() {
                return Err(ModelError::new("metadata", "keys must not be empty"));
            }
            text(&field, k, MAX_LABEL)?;
            text(&field, v, MAX_METADATA_VALUE)?;
        }
        ep.metadata = metadata;
        ep.validate()?;
        Ok(ep)
    };
    check().map_err(|m| invalid(m.within("endpoint")))
}

// === model → responses ===

fn service_pb(info: &ServiceInfo) -> pb::Service {
    let c = &info.settings;
    let (lb_policy, active_request_bias) = match c.lb {
        LbPolicy::LeastRequest {
            active_request_bias,
        } => (pb::LbPolicy::LeastRequest, Some(active_request_bias)),
        LbPolicy::RoundRobin => (pb::LbPolicy::RoundRobin, None),
    };
    let dur = |d: Duration| prost_types::Duration::try_from(d).ok();
    pb::Service {
        name: c.name.clone(),
        lb_policy: lb_policy.into(),
        active_request_bias,
        connect_timeout: dur(c.connect_timeout),
        request_timeout: c.request_timeout.and_then(dur),
        authority: c.authority.clone(),
        endpoint_count: u32::try_from(info.endpoints).unwrap_or(u32::MAX),
    }
}

fn endpoint_pb(service: &str, e: &Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        service: service.to_owned(),
        address: e.address.to_string(),
        weight: Some(e.weight),
        zone: e.zone.clone().unwrap_or_default(),
        metadata: e
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        identity: e.identity.clone(),
        draining: e.draining,
    }
}

fn event_pb(e: &Event) -> pb::WatchEvent {
    use pb::ChangeKind as K;
    let mut ev = pb::WatchEvent {
        version: e.version,
        service: e.change.service().to_owned(),
        ..Default::default()
    };
    // A change carries the settings alone: no endpoint count.
    let info = |c: &Cluster| ServiceInfo {
        settings: c.clone(),
        endpoints: 0,
    };
    let kind = match &e.change {
        Change::ServiceCreated(c) => {
            ev.service_state = Some(service_pb(&info(c)));
            K::ServiceCreated
        }
        Change::ServiceUpdated(c) => {
            ev.service_state = Some(service_pb(&info(c)));
            K::ServiceUpdated
        }
        Change::ServiceDeleted { .. } => K::ServiceDeleted,
        Change::EndpointAdded { service, endpoint } => {
            ev.address = endpoint.address.to_string();
            ev.endpoint_state = Some(endpoint_pb(service, endpoint));
            K::EndpointAdded
        }
        Change::EndpointUpdated { service, endpoint } => {
            ev.address = endpoint.address.to_string();
            ev.endpoint_state = Some(endpoint_pb(service, endpoint));
            K::EndpointUpdated
        }
        Change::EndpointRemoved { address, .. } => {
            ev.address = address.to_string();
            K::EndpointRemoved
        }
    };
    ev.kind = kind.into();
    ev
}

fn node_pb(n: &NodeStatus) -> pb::Node {
    pb::Node {
        node_id: n.node_id.clone(),
        service: n.service.clone(),
        user_agent: n.user_agent.clone(),
        connected: n.connected,
        connected_since: Some(n.connected_since.into()),
        acked: n
            .acked
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        last_nack: n.last_nack.as_ref().map(|x| pb::Nack {
            type_url: x.type_url.clone(),
            version: x.version.clone(),
            error: x.error.clone(),
            at: Some(x.at.into()),
        }),
        pushes: n.pushes,
    }
}

// === impl MeshAdmin ===

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl MeshAdmin for AdminApi {
    async fn create_service(
        &self,
        req: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let req = req.into_inner();
        let s = req.service.as_ref().ok_or_else(|| required("service"))?;
        service_name("service.name", &s.name)?;
        let c = new_service(s).map_err(|e| invalid(e.within("service")))?;
        let (version, info) = self
            .registry
            .create_service(c)
            .await
            .map_err(|e| status(e, "service"))?;
        tracing::info!(version, service = %info.settings.name, "service created");
        Ok(Response::new(pb::ServiceResponse {
            version,
            service: Some(service_pb(&info)),
        }))
    }

    async fn update_service(
        &self,
        req: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::ServiceResponse>, Status> {
        let req = req.into_inner();
        let s = req.service.as_ref().ok_or_else(|| required("service"))?;
        service_name("service.name", &s.name)?;
        let paths = req.update_mask.map(|m| m.paths).unwrap_or_default();
        let patch = service_patch(s, &paths).map_err(invalid)?;
        let (version, info) = self
            .registry
            .update_service(&s.name, patch)
            .await
            .map_err(|e| status(e, "service"))?;
        tracing::info!(version, service = %s.name, fields = ?paths, "service updated");
        Ok(Response::new(pb::ServiceResponse {
            version,
            service: Some(service_pb(&info)),
        }))
    }

    async fn delete_service(
        &self,
        req: Request<pb::DeleteServiceRequest>,
    ) -> Result<Response<pb::DeleteServiceResponse>, Status> {
        let name = req.into_inner().name;
        service_name("name", &name)?;
        let (version, removed) = self
            .registry
            .delete_service(&name)
            .await
            .map_err(|e| status(e, ""))?;
        tracing::info!(version, service = %name, endpoints = removed, "service deleted");
        Ok(Response::new(pb::DeleteServiceResponse {
            version,
            endpoints_removed: u32::try_from(removed).unwrap_or(u32::MAX),
        }))
    }

    async fn get_service(
        &self,
        req: Request<pb::GetServiceRequest>,
    ) -> Result<Response<pb::GetServiceResponse>, Status> {
        let name = req.into_inner().name;
        service_name("name", &name)?;
        let (version, c) = self.registry.service(&name).map_err(|e| status(e, ""))?;
        let endpoints = c.endpoints.iter().map(|e| endpoint_pb(&name, e)).collect();
        let info = ServiceInfo {
            endpoints: c.endpoints.len(),
            settings: c,
        };
        Ok(Response::new(pb::GetServiceResponse {
            version,
            service: Some(service_pb(&info)),
            endpoints,
        }))
    }

    async fn list_services(
        &self,
        _req: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let (version, infos) = self.registry.services();
        Ok(Response::new(pb::ListServicesResponse {
            version,
            services: infos.iter().map(service_pb).collect(),
        }))
    }

    async fn add_endpoint(
        &self,
        req: Request<pb::AddEndpointRequest>,
    ) -> Result<Response<pb::EndpointResponse>, Status> {
        let req = req.into_inner();
        service_name("service", &req.service)?;
        let e = req.endpoint.as_ref().ok_or_else(|| required("endpoint"))?;
        if !e.service.is_empty() && e.service != req.service {
            return Err(invalid(ModelError::new(
                "endpoint.service",
                format!(
                    "{:?} differs from service {:?} (leave it empty)",
                    e.service, req.service
                ),
            )));
        }
        let ep = new_endpoint(e)?;
        let (version, ep) = self
            .registry
            .add_endpoint(&req.service, ep)
            .await
            .map_err(|e| status(e, "endpoint"))?;
        tracing::info!(version, service = %req.service, address = %ep.address, weight = ep.weight, "endpoint added");
        Ok(Response::new(pb::EndpointResponse {
            version,
            endpoint: Some(endpoint_pb(&req.service, &ep)),
        }))
    }

    async fn remove_endpoint(
        &self,
        req: Request<pb::RemoveEndpointRequest>,
    ) -> Result<Response<pb::RemoveEndpointResponse>, Status> {
        let req = req.into_inner();
        service_name("service", &req.service)?;
        let addr = address("address", &req.address)?;
        let version = self
            .registry
            .remove_endpoint(&req.service, addr)
            .await
            .map_err(|e| status(e, ""))?;
        tracing::info!(version, service = %req.service, address = %addr, "endpoint removed");
        Ok(Response::new(pb::RemoveEndpointResponse { version }))
    }

    async fn list_endpoints(
        &self,
        req: Request<pb::ListEndpointsRequest>,
    ) -> Result<Response<pb::ListEndpointsResponse>, Status> {
        let service = req.into_inner().service;
        service_name("service", &service)?;
        let (version, eps) = self
            .registry
            .endpoints(&service)
            .map_err(|e| status(e, ""))?;
        Ok(Response::new(pb::ListEndpointsResponse {
            version,
            endpoints: eps.iter().map(|e| endpoint_pb(&service, e)).collect(),
        }))
    }

    async fn set_endpoint_weight(
        &self,
        req: Request<pb::SetEndpointWeightRequest>,
    ) -> Result<Response<pb::EndpointResponse>, Status> {
        let req = req.into_inner();
        service_name("service", &req.service)?;
        let addr = address("address", &req.address)?;
        let patch = EndpointPatch {
            weight: Some(req.weight),
            draining: None,
        };
        self.update_endpoint(&req.service, addr, patch).await
    }

    async fn drain_endpoint(
        &self,
        req: Request<pb::DrainEndpointRequest>,
    ) -> Result<Response<pb::EndpointResponse>, Status> {
        let req = req.into_inner();
        service_name("service", &req.service)?;
        let addr = address("address", &req.address)?;
        let patch = EndpointPatch {
            weight: None,
            draining: Some(req.draining.unwrap_or(true)),
        };
        self.update_endpoint(&req.service, addr, patch).await
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        _req: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let (version, rx) = self.registry.subscribe();
        let first = pb::WatchEvent {
            version,
            kind: pb::ChangeKind::Current.into(),
            ..Default::default()
        };
        Ok(Response::new(watch_stream(
            first,
            rx,
            self.shutdown.clone(),
        )))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(pb::StatusResponse {
            version: self.registry.version(),
            published_version: self.snapshots.borrow().version,
            nodes: self.nodes.list().iter().map(node_pb).collect(),
        }))
    }
}

impl AdminApi {
    async fn update_endpoint(
        &self,
        service: &str,
        addr: SocketAddr,
        patch: EndpointPatch,
    ) -> Result<Response<pb::EndpointResponse>, Status> {
        let (version, ep) = self
            .registry
            .update_endpoint(service, addr, patch)
            .await
            .map_err(|e| status(e, ""))?;
        tracing::info!(version, %service, address = %addr, weight = ep.weight, draining = ep.draining, "endpoint updated");
        Ok(Response::new(pb::EndpointResponse {
            version,
            endpoint: Some(endpoint_pb(service, &ep)),
        }))
    }
}

/// The current version, then every event, until the watcher lags, the
/// registry goes or the control plane stops.
fn watch_stream(
    first: pb::WatchEvent,
    rx: broadcast::Receiver<Arc<Event>>,
    shutdown: CancellationToken,
) -> WatchStream {
    struct St {
        first: Option<pb::WatchEvent>,
        rx: Option<broadcast::Receiver<Arc<Event>>>,
        shutdown: CancellationToken,
    }
    let st = St {
        first: Some(first),
        rx: Some(rx),
        shutdown,
    };
    Box::pin(futures_util::stream::unfold(st, |mut st| async move {
        if let Some(first) = st.first.take() {
            return Some((Ok(first), st));
        }
        let mut rx = st.rx.take()?;
        let item = tokio::select! {
            () = st.shutdown.cancelled() => {
                Err(Status::unavailable("the control plane is shutting down"))
            }
            r = rx.recv() => match r {
                Ok(ev) => {
                    st.rx = Some(rx);
                    Ok(event_pb(&ev))
                }
                Err(broadcast::error::RecvError::Lagged(n)) => Err(Status::resource_exhausted(
                    format!("this watcher fell {n} events behind; watch again"),
                )),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        };
        Some((item, st))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> pb::Service {
        pb::Service {
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn new_services_get_defaults_and_precise_errors() {
        let c = new_service(&svc("greeter")).unwrap();
        assert_eq!(c, Cluster::new("greeter"));

        let mut s = svc("greeter");
        s.lb_policy = pb::LbPolicy::RoundRobin.into();
        s.active_request_bias = Some(1.0);
        assert_eq!(new_service(&s).unwrap_err().field, "active_request_bias");
        s.lb_policy = 7;
        assert_eq!(new_service(&s).unwrap_err().field, "lb_policy");
        let mut s = svc("greeter");
        s.active_request_bias = Some(11.0);
        assert_eq!(new_service(&s).unwrap_err().field, "active_request_bias");
        let mut s = svc("greeter");
        s.connect_timeout = Some(prost_types::Duration {
            seconds: -1,
            nanos: 0,
        });
        assert_eq!(new_service(&s).unwrap_err().field, "connect_timeout");
        let mut s = svc("greeter");
        s.authority = Some(String::new());
        assert_eq!(new_service(&s).unwrap_err().field, "authority");
    }

    #[test]
    fn update_masks_are_checked() {
        let s = svc("greeter");
        let e = service_patch(&s, &[]).unwrap_err();
        assert_eq!(e.field, "update_mask");
        let e = service_patch(&s, &["connect_timeout".into(), "colour".into()]).unwrap_err();
        assert_eq!(e.field, "update_mask.paths[1]");
        assert!(e.reason.contains("\"colour\""), "{e}");
        let p = service_patch(&s, &["service.request_timeout".into(), "authority".into()]).unwrap();
        assert_eq!(p.request_timeout, Some(None));
        assert_eq!(p.authority, Some(None));
        assert_eq!(p.connect_timeout, None);
    }

    #[test]
    fn endpoints_are_checked_field_by_field() {
        let ep = |f: &dyn Fn(&mut pb::Endpoint)| {
            let mut e = pb::Endpoint {
                address: "10.0.0.1:80".into(),
                ..Default::default()
            };
            f(&mut e);
            new_endpoint(&e).map_err(|s| (s.code(), s.message().to_owned()))
        };
        assert_eq!(ep(&|_| {}).unwrap().weight, 1);
        let field = |r: Result<Endpoint, (tonic::Code, String)>| {
            let (code, msg) = r.unwrap_err();
            assert_eq!(code, tonic::Code::InvalidArgument);
            msg.split(':').next().unwrap().to_owned()
        };
        assert_eq!(field(ep(&|e| e.weight = Some(0))), "endpoint.weight");
        assert_eq!(
            field(ep(&|e| e.address = "nope".into())),
            "endpoint.address"
        );
        assert_eq!(
            field(ep(&|e| e.address = "0.0.0.0:80".into())),
            "endpoint.address"
        );
        assert_eq!(
            field(ep(&|e| e.identity = Some(String::new()))),
            "endpoint.identity"
        );
        assert_eq!(field(ep(&|e| e.zone = "a\nb".into())), "endpoint.zone");
        let m = field(ep(&|e| {
            e.metadata.insert("k".into(), "\u{7}".into());
        }));
        assert_eq!(m, "endpoint.metadata[\"k\"]");
    }

    #[test]
    fn registry_errors_become_grpc_codes() {
        use tonic::Code;
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
}
