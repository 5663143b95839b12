//! AWS KMS key provider (also LocalStack, moto, any KMS-compatible endpoint).

/// Checks the `<key>` part of `aws-kms:<key>`: a key id (UUID or `mrk-…`),
/// `alias/<name>`, or a key / alias ARN.
pub fn validate_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("an AWS KMS key reference needs a key id, alias/<name> or an ARN".into());
    }
    if id.len() > 2048 || id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("an AWS KMS key id has no whitespace and at most 2048 characters".into());
    }
    if let Some(alias) = id.strip_prefix("alias/") {
        let ok = !alias.is_empty()
            && !alias.starts_with("aws/")
            && alias
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "/_-".contains(c));
        return if ok {
            Ok(())
        } else {
            Err(
                "an alias is alias/<name> with letters, digits, '/', '_' or '-' (not alias/aws/…)"
                    .into(),
            )
        };
    }
    if id.starts_with("arn:") {
        let parts: Vec<&str> = id.splitn(6, ':').collect();
        let ok = parts.len() == 6
            && parts[2] == "kms"
            && (parts[5].starts_with("key/") || parts[5].starts_with("alias/"));
        return if ok {
            Ok(())
        } else {
            Err("expected arn:<partition>:kms:<region>:<account>:key/<id> or …:alias/<name>".into())
        };
    }
    if id
        .chars()
        .all(|c| c.is_ascii_hexdigit() || c == '-' || c == 'm' || c == 'r' || c == 'k')
    {
        return Ok(());
    }
    Err("expected a key id (UUID), alias/<name> or an arn:aws:kms:… ARN".into())
}
