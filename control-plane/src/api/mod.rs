//! The admin gRPC API (`meshwire.admin.v1.MeshAdmin`, see
//! `proto/meshwire/admin/v1/admin.proto`): each request is checked
//! (`INVALID_ARGUMENT` naming the field by its path in the request), turned
//! into one [`Registry`] call, and answered once its change is committed.
//!
//! `convert` turns requests into model values (field-path errors) and model
//! values into responses; `status` maps the domain's errors (registry, CA)
//! to gRPC statuses, for this API and [`crate::identity_api`]; this module
//! holds the handlers.

mod convert;
pub(crate) mod status;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use meshwire_mesh::ModelError;
use meshwire_proto::admin::v1 as pb;
use meshwire_proto::admin::v1::mesh_admin_server::{MeshAdmin, MeshAdminServer};
use meshwire_xds::Snapshot;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status};

use crate::auth::RequireToken;
use crate::ca::{ADMIN_SERVICE, CONTROL_PLANE_NAMESPACE, Ca, CaError, DEFAULT_TOKEN_TTL};
use crate::nodes::NodeRegistry;
use crate::registry::{EndpointPatch, Event, Registry, ServiceInfo, check_service_name};

pub use self::convert::ca_status;
pub(crate) use self::convert::policy_pb;
use self::convert::{
    address, duration, endpoint_pb, event_pb, fingerprint_arg, new_endpoint, new_service, node_pb,
    service_name, service_patch, service_pb,
};
use self::status::{invalid, required, status};

pub type AdminService = InterceptedService<MeshAdminServer<AdminApi>, RequireToken>;

/// The admin API over a [`Registry`].
#[derive(Debug, Clone)]
pub struct AdminApi {
    registry: Arc<Registry>,
    nodes: Arc<NodeRegistry>,
    snapshots: watch::Receiver<Arc<Snapshot>>,
    shutdown: CancellationToken,
    ca: Arc<Ca>,
}

impl AdminApi {
    /// `snapshots` is what xDS serves (for `Status`); `shutdown` ends `Watch`
    /// streams so a graceful stop is not held up by them.
    pub fn new(
        registry: Arc<Registry>,
        nodes: Arc<NodeRegistry>,
        snapshots: watch::Receiver<Arc<Snapshot>>,
        shutdown: CancellationToken,
        ca: Arc<Ca>,
    ) -> Self {
        Self {
            registry,
            nodes,
            snapshots,
            shutdown,
            ca,
        }
    }

    /// The gRPC service, behind the bearer-token check (or, over TLS, a
    /// client certificate with the CA's admin identity).
    pub fn into_service(self, token: &str) -> AdminService {
        let auth = match self.ca.spiffe_id(CONTROL_PLANE_NAMESPACE, ADMIN_SERVICE) {
            Ok(id) => RequireToken::new(token).with_admin_identity(id.as_str()),
            Err(_) => RequireToken::new(token),
        };
        MeshAdminServer::with_interceptor(self, auth)
    }

    fn ca_status(&self) -> pb::CaStatus {
        ca_status(&self.ca)
    }

    async fn ca_op<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Ca) -> Result<T, CaError> + Send + 'static,
    ) -> Result<T, Status> {
        status::ca_call(&self.ca, f).await
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

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::JoinToken>, Status> {
        self.create_join_token_impl(req.into_inner())
            .await
            .map(Response::new)
    }

    async fn get_ca(
        &self,
        _req: Request<pb::GetCaRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        Ok(Response::new(self.ca_status()))
    }

    async fn add_root(
        &self,
        _req: Request<pb::AddRootRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.ca_op(|ca| ca.add_root()).await?;
        Ok(Response::new(self.ca_status()))
    }

    async fn activate_root(
        &self,
        req: Request<pb::ActivateRootRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let fp = req.into_inner().fingerprint;
        fingerprint_arg(&fp)?;
        self.ca_op(move |ca| ca.activate(&fp)).await?;
        Ok(Response::new(self.ca_status()))
    }

    async fn remove_root(
        &self,
        req: Request<pb::RemoveRootRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        let fp = req.into_inner().fingerprint;
        fingerprint_arg(&fp)?;
        self.ca_op(move |ca| ca.remove_root(&fp)).await?;
        Ok(Response::new(self.ca_status()))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let unhealthy_endpoints = self
            .registry
            .snapshot()
            .clusters
            .iter()
            .flat_map(|(name, c)| c.endpoints.iter().map(move |e| (name, e)))
            .filter(|(_, e)| e.is_unhealthy())
            .map(|(name, e)| endpoint_pb(name, e))
            .collect();
        Ok(Response::new(pb::StatusResponse {
            version: self.registry.version(),
            published_version: self.snapshots.borrow().version,
            nodes: self.nodes.list().iter().map(node_pb).collect(),
            unhealthy_endpoints,
        }))
    }

    async fn control_plane_status(
        &self,
        _req: Request<pb::ControlPlaneStatusRequest>,
    ) -> Result<Response<pb::ControlPlaneStatusResponse>, Status> {
        let store = self.registry.store_description();
        let replicas = self
            .registry
            .replicas()
            .await
            .map_err(|e| status(e.into(), ""))?
            .unwrap_or_default();
        Ok(Response::new(pb::ControlPlaneStatusResponse {
            store,
            replica_id: replicas.me,
            replicas: replicas
                .replicas
                .into_iter()
                .map(|r| pb::Replica {
                    id: r.id,
                    address: r.address,
                    revision: r.revision,
                    version: r.version,
                })
                .collect(),
            leader: replicas.leader.unwrap_or_default(),
        }))
    }
}

impl AdminApi {
    async fn create_join_token_impl(
        &self,
        req: pb::CreateJoinTokenRequest,
    ) -> Result<pb::JoinToken, Status> {
        service_name("service", &req.service)?;
        let namespace = if req.namespace.is_empty() {
            "default".to_owned()
        } else {
            req.namespace
        };
        if check_service_name("namespace", &namespace).is_err() || namespace.contains('.') {
            return Err(invalid(ModelError::new(
                "namespace",
                format!("{namespace:?}: lowercase letters, digits and '-' only"),
            )));
        }
        let ttl = duration("ttl", req.ttl.as_ref())
            .map_err(invalid)?
            .unwrap_or(DEFAULT_TOKEN_TTL);
        // A token for a service that does not exist is most likely a typo.
        self.registry
            .service(&req.service)
            .map_err(|e| status(e, ""))?;
        let service = req.service;
        let (token, id, expires) = self
            .ca_op(move |ca| ca.create_token(&namespace, &service, ttl))
            .await?;
        Ok(pb::JoinToken {
            token,
            spiffe_id: id.to_string(),
            expires_at: Some(expires.into()),
        })
    }

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
