//! One certificate from the CA: the account (stored, or made and stored),
//! an order for every name, each authorization proven over TLS-ALPN-01 by
//! turnd's own TLS listeners, a fresh key and its request, the chain.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use instant_acme::{Account, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy};

use super::state::State;
use crate::config::Acme;
use crate::net::tls::CertStore;

/// How long the CA may take to validate, and then to issue.
const POLL: RetryPolicy = RetryPolicy::new().initial_delay(Duration::from_millis(250)).backoff(1.5).timeout(Duration::from_secs(90));

/// The account at the configured CA: the stored one, or a new one (stored).
pub async fn account(cfg: &Acme, state: &State) -> anyhow::Result<Account> {
    let builder = match &cfg.ca_root {
        Some(root) => Account::builder_with_root(root).with_context(|| format!("tls.acme.ca_root {}", root.display()))?,
        None => Account::builder().context("the system's trusted certificates")?,
    };
    if let Some(credentials) = state.account(&cfg.directory) {
        return builder.from_credentials(credentials).await.with_context(|| format!("the stored ACME account at {}", cfg.directory));
    }
    let contact: Vec<&str> = cfg.contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) =
        builder.create(&new, cfg.directory.clone(), None).await.with_context(|| format!("creating an ACME account at {}", cfg.directory))?;
    state.save_account(&cfg.directory, credentials).context("storing the ACME account")?;
    tracing::info!(directory = %cfg.directory, "ACME account created");
    Ok(account)
}

/// Orders a certificate for `cfg.names`, answering the challenges through
/// `store`. Returns the chain and its private key, PEM.
pub async fn issue(account: &Account, cfg: &Acme, store: &CertStore) -> anyhow::Result<(String, String)> {
    let ids: Vec<Identifier> = cfg.names.iter().map(|n| Identifier::Dns(n.clone())).collect();
    let mut order = account.new_order(&NewOrder::new(&ids)).await.context("new order")?;
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut a = a.context("authorization")?;
        let name = a.identifier().to_string();
        match a.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => bail!("the CA's authorization for {name} is {other:?}"),
        }
        let mut challenge = a
            .challenge(ChallengeType::TlsAlpn01)
            .ok_or_else(|| anyhow!("the CA offers no tls-alpn-01 challenge for {name}"))?;
        let digest = challenge.key_authorization().digest();
        store.set_challenge(&name, super::challenge::certificate(&name, digest.as_ref(), store.provider())?);
        challenge.set_ready().await.with_context(|| format!("challenge for {name}"))?;
    }
    let status = order.poll_ready(&POLL).await.context("waiting for validation")?;
    if status != OrderStatus::Ready {
        bail!("the CA did not validate {}: {}", cfg.names.join(", "), why_invalid(&mut order).await);
    }
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::new(cfg.names.clone())?.serialize_request(&key)?;
    order.finalize_csr(csr.der()).await.context("finalizing the order")?;
    let chain = order.poll_certificate(&POLL).await.context("waiting for the certificate")?;
    Ok((chain, key.serialize_pem()))
}

/// The CA's own words on a failed validation, as far as it gave them.
async fn why_invalid(order: &mut instant_acme::Order) -> String {
    let mut why = Vec::new();
    if let Some(p) = &order.state().error {
        why.push(p.to_string());
    }
    let mut authorizations = order.authorizations();
    while let Some(Ok(a)) = authorizations.next().await {
        for c in &a.challenges {
            if let Some(p) = &c.error {
                why.push(format!("{}: {p}", a.identifier()));
            }
        }
    }
    if why.is_empty() {
        "no reason given (is this host's port 443 reachable from the internet under that name?)".to_owned()
    } else {
        why.join("; ")
    }
}
