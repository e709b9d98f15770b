//! The environment's private PKI: one CA that signs the apiserver's serving
//! certificate and every client certificate, and the service-account token
//! signing key pair. Keys are ECDSA P-256 (PKCS#8 PEM), which the apiserver,
//! kubectl and rustls all accept.

use super::{Error, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, date_time_ymd,
};
use std::path::{Path, PathBuf};

/// OID of X.520 `organizationName`: Kubernetes reads every O as a group.
const ORGANIZATION_OID: [u64; 4] = [2, 5, 4, 10];

/// The CA (kept in memory to sign more client certificates later).
pub(crate) struct Pki {
    ca_params: CertificateParams,
    ca_key: KeyPair,
    /// Directory holding every PEM file written.
    pub(crate) dir: PathBuf,
    /// The CA certificate file.
    pub(crate) ca_cert: PathBuf,
    /// The CA key file (kube-controller-manager's CSR signer needs it).
    pub(crate) ca_key_file: PathBuf,
}

/// A certificate and key written to disk.
pub(crate) struct CertFiles {
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

fn base_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.not_before = date_time_ymd(2020, 1, 1);
    params.not_after = date_time_ymd(2100, 1, 1);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))
}

impl Pki {
    /// Generates a CA and writes `ca.crt` into `dir`.
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        let ca_key = KeyPair::generate().map_err(Error::pki("CA key"))?;
        let mut ca_params = base_params("palisade-testenv-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = ca_params
            .self_signed(&ca_key)
            .map_err(Error::pki("CA certificate"))?;
        let ca_cert = dir.join("ca.crt");
        write(&ca_cert, &ca.pem())?;
        let ca_key_file = dir.join("ca.key");
        write(&ca_key_file, &ca_key.serialize_pem())?;
        Ok(Pki {
            ca_params,
            ca_key,
            dir: dir.to_path_buf(),
            ca_cert,
            ca_key_file,
        })
    }

    fn sign(&self, name: &str, params: &CertificateParams) -> Result<CertFiles> {
        let key = KeyPair::generate().map_err(Error::pki(format!("{name} key")))?;
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(Error::pki(format!("{name} certificate")))?;
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        write(&files.cert, &cert.pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }

    /// The apiserver's serving certificate: loopback addresses and the
    /// in-cluster names of the `kubernetes` Service.
    pub(crate) fn serving_cert(&self, service_ip: &str) -> Result<CertFiles> {
        let sans = [
            "127.0.0.1",
            "::1",
            "localhost",
            service_ip,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ];
        let mut params = CertificateParams::new(sans.map(String::from).to_vec())
            .map_err(Error::pki("serving SANs"))?;
        let base = base_params("kube-apiserver");
        params.distinguished_name = base.distinguished_name;
        params.not_before = base.not_before;
        params.not_after = base.not_after;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign("apiserver", &params)
    }

    /// A client certificate for `user` in `groups` (CN = user, one O per
    /// group). The apiserver authenticates it through `--client-ca-file`.
    ///
    /// At most two groups: the certificate library keeps one value per
    /// attribute type, so the second group is written under the same OID as
    /// a distinct custom attribute.
    pub(crate) fn client_cert(
        &self,
        file_stem: &str,
        user: &str,
        groups: &[&str],
    ) -> Result<CertFiles> {
        if groups.len() > 2 {
            return Err(Error::Invalid(format!(
                "client certificates carry at most two groups, {user} asked for {groups:?}"
            )));
        }
        let mut params = base_params(user);
        if let Some(first) = groups.first() {
            params
                .distinguished_name
                .push(DnType::OrganizationName, *first);
        }
        if let Some(second) = groups.get(1) {
            params
                .distinguished_name
                .push(DnType::CustomDnType(ORGANIZATION_OID.to_vec()), *second);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(file_stem, &params)
    }

    /// The service-account token signing key pair (`sa.key`, `sa.pub`).
    pub(crate) fn service_account_keys(&self) -> Result<CertFiles> {
        let key = KeyPair::generate().map_err(Error::pki("service-account signing key"))?;
        let files = CertFiles {
            cert: self.dir.join("sa.pub"),
            key: self.dir.join("sa.key"),
        };
        write(&files.cert, &key.public_key_pem())?;
        write(&files.key, &key.serialize_pem())?;
        Ok(files)
    }
}
