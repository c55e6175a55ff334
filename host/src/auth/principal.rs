//! The verified caller and the role checks every handler makes.

use crate::domain::TenantId;
use crate::error::ApiError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Reader,
    Writer,
    Admin,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::Reader => "reader",
            Self::Writer => "writer",
            Self::Admin => "admin",
        }
    }
}

/// A caller whose token was verified.
#[derive(Debug, Clone)]
pub struct Principal {
    pub subject: String,
    pub tenant: Option<TenantId>,
    /// The highest tenant role held (admin ⊃ writer ⊃ reader).
    pub role: Option<Role>,
    pub platform_admin: bool,
}

impl Principal {
    pub fn from_claims(claims: super::Claims) -> Result<Self, ApiError> {
        let tenant = match claims.tenant_id.as_deref() {
            Some(t) => Some(TenantId::parse(t).map_err(|_| {
                ApiError::Unauthorized("the token's tenant_id is not a valid tenant id".into())
            })?),
            None => None,
        };
        let role = claims
            .roles
            .iter()
            .filter_map(|r| match r.as_str() {
                "reader" => Some(Role::Reader),
                "writer" => Some(Role::Writer),
                "admin" => Some(Role::Admin),
                _ => None,
            })
            .max();
        Ok(Self {
            subject: claims.sub,
            tenant,
            role,
            platform_admin: claims.roles.iter().any(|r| r == "platform-admin"),
        })
    }

    /// The caller's tenant, if the caller holds at least `needed` in it.
    pub fn tenant_with(&self, needed: Role) -> Result<&TenantId, ApiError> {
        let tenant = self.tenant.as_ref().ok_or_else(|| {
            ApiError::Forbidden("this token carries no tenant_id; tenant APIs need one".into())
        })?;
        match self.role {
            Some(r) if r >= needed => Ok(tenant),
            _ => Err(ApiError::Forbidden(format!(
                "this needs the {} role (or higher)",
                needed.as_str()
            ))),
        }
    }

    pub fn require_platform_admin(&self) -> Result<(), ApiError> {
        if self.platform_admin {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "tenant lifecycle needs the platform-admin role".into(),
            ))
        }
    }

    /// `user:<sub>`, as events and schema history record the actor.
    pub fn actor(&self) -> String {
        format!("user:{}", self.subject)
    }
}
