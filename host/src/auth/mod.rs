//! Who is calling: bearer JWTs verified with the local HS256 secret or the
//! Auth Service's JWKS, turned into a [`Principal`]. The tenant of a request
//! comes only from the verified token.

pub mod jwt;
pub mod local_secret;
pub mod principal;
pub mod token_cache;

pub use jwt::{Authenticator, Claims};
pub use local_secret::LocalSecret;
pub use principal::{Principal, Role};
pub use token_cache::TokenCache;
