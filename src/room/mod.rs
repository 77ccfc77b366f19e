//! Waiting rooms: definitions, the durable FIFO queue, admission, visitors and tokens.

pub mod driver;

use std::sync::Arc;

use crate::clock::Clock;
use crate::config::Config;
use crate::secrets::Secrets;
use crate::store::{Store, StoreError};

pub struct Rooms {}

impl Rooms {
    pub async fn load(
        _store: Arc<dyn Store>,
        _clock: Arc<dyn Clock>,
        _secrets: &Secrets,
        _config: &Config,
    ) -> Result<Arc<Self>, StoreError> {
        Ok(Arc::new(Rooms {}))
    }
}
