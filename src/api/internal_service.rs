//! `huleedu.bos.v1.BatchInternalService`: other services read any batch's pipeline state. The auth layer has
//! already checked the internal API key.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::auth::InternalCaller;
use super::errors::{to_status, ApiError};
use super::views::batch_view;
use crate::core::ids::BatchId;
use crate::core::input::Actor;
use crate::core::orchestrator::Orchestrator;
use crate::proto::huleedu::bos::v1 as pb;
use crate::proto::huleedu::bos::v1::batch_internal_service_server::BatchInternalService;

pub struct InternalApi {
    orchestrator: Arc<Orchestrator>,
}

impl InternalApi {
    pub fn new(orchestrator: Arc<Orchestrator>) -> Self {
        Self { orchestrator }
    }
}

#[tonic::async_trait]
impl BatchInternalService for InternalApi {
    async fn get_pipeline_state(
        &self,
        request: Request<pb::GetPipelineStateRequest>,
    ) -> Result<Response<pb::GetPipelineStateResponse>, Status> {
        // Defence in depth: without the layer's verdict nothing is served.
        if request.extensions().get::<InternalCaller>().is_none() {
            return Err(to_status(ApiError::Unauthenticated(
                "missing or wrong internal API key".to_owned(),
            )));
        }
        let batch_id =
            BatchId::parse("batch_id", &request.get_ref().batch_id).map_err(to_status)?;
        let aggregate = self
            .orchestrator
            .batch_for(&Actor::Internal, batch_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::GetPipelineStateResponse {
            batch: Some(batch_view(&aggregate)),
        }))
    }
}
