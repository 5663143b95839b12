//! KMS keys for the tests (`test-hooks` builds only): production CMKs are the
//! customer's to create, see [`crate::keys::KeyProvider::create_key`]. This is
//! the one user of `aws-lc-rs` (RSA-OAEP wrap of imported key material).

use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{AlgorithmSpec, ExpirationModelType, OriginType, Tag, WrappingKeySpec};

use super::{AwsKmsProvider, PROVIDER, validate_key_id};
use crate::keys::{KeyError, KeyRef, SecretKey};

impl AwsKmsProvider {
    /// **For tests and development only.** Creates a symmetric KMS key (KMS-generated
    /// material), optionally with an alias, and returns a reference to its ARN.
    /// Production CMKs are the customer's to create, see [`KeyProvider::create_key`].
    pub async fn create_test_key(&self, alias: Option<&str>) -> Result<KeyRef, KeyError> {
        self.create_key_with_origin(alias, OriginType::AwsKms).await
    }

    /// **For tests and development only.** Creates a symmetric KMS key with origin
    /// `EXTERNAL` and imports fresh random key material into it
    /// (`GetParametersForImport` with RSAES_OAEP_SHA_256 / RSA_2048, then
    /// `ImportKeyMaterial`, material that does not expire). The material is
    /// zeroized right after the import, so once `DeleteImportedKeyMaterial` has
    /// run ([`KeyProvider::destroy`]) nobody can bring this key back.
    pub async fn create_imported_key(&self, alias: Option<&str>) -> Result<KeyRef, KeyError> {
        let key = self
            .create_key_with_origin(alias, OriginType::External)
            .await?;
        self.import_fresh_material(&key).await?;
        Ok(key)
    }

    async fn create_key_with_origin(
        &self,
        alias: Option<&str>,
        origin: OriginType,
    ) -> Result<KeyRef, KeyError> {
        if let Some(alias) = alias {
            validate_key_id(alias).map_err(|reason| crate::keys::InvalidKeyRef {
                input: alias.to_owned(),
                reason,
            })?;
            if !alias.starts_with("alias/") {
                return Err(crate::keys::InvalidKeyRef {
                    input: alias.to_owned(),
                    reason: "an alias to create is alias/<name>".into(),
                }
                .into());
            }
        }
        let tag = Tag::builder()
            .tag_key("custos")
            .tag_value("test")
            .build()
            .map_err(|e| self.backend("(new key)", format!("CreateKey: {e}")))?;
        let description = format!(
            "custos test key{}",
            alias.map(|a| format!(" ({a})")).unwrap_or_default()
        );
        let out = self
            .call("CreateKey", &[], || {
                self.client
                    .create_key()
                    .description(description.clone())
                    .origin(origin.clone())
                    .tags(tag.clone())
                    .send()
            })
            .await?;
        let meta = out.key_metadata().ok_or_else(|| {
            self.backend("(new key)", "CreateKey returned no key metadata".into())
        })?;
        let arn = meta.arn().unwrap_or(meta.key_id()).to_owned();
        let key = KeyRef::parse(&format!("{PROVIDER}:{arn}"))?;
        if let Some(alias) = alias {
            self.call("CreateAlias", &[key.id()], || {
                self.client
                    .create_alias()
                    .alias_name(alias)
                    .target_key_id(key.id())
                    .send()
            })
            .await?;
        }
        Ok(key)
    }

    async fn import_fresh_material(&self, key: &KeyRef) -> Result<(), KeyError> {
        use aws_lc_rs::rsa::{
            OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey,
        };

        let params = self
            .call("GetParametersForImport", &[key.id()], || {
                self.client
                    .get_parameters_for_import()
                    .key_id(key.id())
                    .wrapping_algorithm(AlgorithmSpec::RsaesOaepSha256)
                    .wrapping_key_spec(WrappingKeySpec::Rsa2048)
                    .send()
            })
            .await?;
        let (Some(token), Some(public_key)) = (params.import_token(), params.public_key()) else {
            return Err(self.backend(
                key.id(),
                "GetParametersForImport returned no import token or public key".into(),
            ));
        };
        let public_key = PublicEncryptingKey::from_der(public_key.as_ref()).map_err(|e| {
            self.backend(
                key.id(),
                format!("GetParametersForImport: unusable public key: {e}"),
            )
        })?;
        let public_key = OaepPublicEncryptingKey::new(public_key).map_err(|e| {
            self.backend(
                key.id(),
                format!("GetParametersForImport: unusable public key: {e}"),
            )
        })?;
        let material = SecretKey::generate();
        let mut wrapped = vec![0u8; public_key.ciphertext_size()];
        let n = public_key
            .encrypt(
                &OAEP_SHA256_MGF1SHA256,
                material.expose(),
                &mut wrapped,
                None,
            )
            .map_err(|e| {
                self.backend(
                    key.id(),
                    format!("RSA-OAEP wrap of key material failed: {e}"),
                )
            })?
            .len();
        drop(material);
        wrapped.truncate(n);
        self.call("ImportKeyMaterial", &[key.id()], || {
            self.client
                .import_key_material()
                .key_id(key.id())
                .import_token(token.clone())
                .encrypted_key_material(Blob::new(wrapped.clone()))
                .expiration_model(ExpirationModelType::KeyMaterialDoesNotExpire)
                .send()
        })
        .await?;
        Ok(())
    }
}
