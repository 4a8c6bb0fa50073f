//! The one query-string policy of every route.
//!
//! Decoding is the WHATWG `application/x-www-form-urlencoded` one (an invalid `%` escape stays
//! as written, bytes that are not UTF-8 become U+FFFD); parameters a route does not read are
//! ignored (cache busters, SDK extras); a parameter it reads, given twice, is refused
//! (`400 invalid_query`) — two values for one setting is a client bug, and silently picking one
//! would hide it. Routes read parameters only through [`Query::get`], so none can differ.

use crate::error::ApiError;

/// A parsed query string.
#[derive(Debug, Default)]
pub struct Query(Vec<(String, String)>);

impl Query {
    /// Parses `raw` (absent: empty).
    ///
    /// ```
    /// use changegate::query::Query;
    /// let query = Query::parse(Some("topic=a&cb=1")).unwrap();
    /// assert_eq!(query.get("topic").unwrap(), Some("a"));
    /// assert!(Query::parse(Some("topic=a&topic=b")).unwrap().get("topic").is_err());
    /// ```
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        serde_urlencoded::from_str(raw.unwrap_or(""))
            .map(Self)
            .map_err(|_| ApiError::bad_request("invalid_query", "the query string is not valid URL encoding"))
    }

    /// The value of `name`, if given once; refused if given more than once.
    pub fn get(&self, name: &str) -> Result<Option<&str>, ApiError> {
        let mut values = self.0.iter().filter(|(n, _)| n == name).map(|(_, v)| v.as_str());
        let first = values.next();
        if values.next().is_some() {
            return Err(ApiError::bad_request(
                "invalid_query",
                format!("query parameter `{name}` was given more than once"),
            ));
        }
        Ok(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_parameters_are_ignored_and_repeated_ones_refused() {
        let query = Query::parse(Some("apikey=k&_=123&apikey2=x")).unwrap();
        assert_eq!(query.get("apikey").unwrap(), Some("k"));
        assert_eq!(query.get("environment").unwrap(), None);
        let repeated = Query::parse(Some("environment=a&environment=b")).unwrap();
        assert_eq!(repeated.get("environment").unwrap_err().code(), "invalid_query");
        // The repeat only matters for a parameter the route reads.
        assert_eq!(repeated.get("apikey").unwrap(), None);
        assert_eq!(Query::parse(Some("a=%zz")).unwrap().get("a").unwrap(), Some("%zz"));
        assert_eq!(Query::parse(None).unwrap().get("a").unwrap(), None);
    }
}
