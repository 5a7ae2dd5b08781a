//! The conditions of a trust rule: which claims a CI identity's token must carry. Small on
//! purpose, so that a rule reads as what it allows:
//!
//! ```text
//! repository == "org/app" && (ref == "refs/heads/main" || ref =~ "refs/tags/v*")
//! ```
//!
//! - A clause is `CLAIM OP "STRING"`. `==` and `!=` compare exactly; `=~` and `!~` match a glob
//!   where `*` is any run of characters (`/` included) and `?` one character.
//! - A claim is a name or a dotted path into nested objects (`a.b`); a segment that is not a
//!   plain name is quoted (`"kubernetes.io".namespace`).
//! - Clauses join with `&&` and `||` (`&&` binds tighter) and group with parentheses.
//! - Only string claims are compared: a missing claim, or one that is a number, a boolean, an
//!   array or an object, makes its clause false, whatever the operator (so `ref != "x"` is
//!   false for a token without `ref`).
//! - Strings escape `"` and `\` with a backslash; nothing else is escaped.
//!
//! Expressions are parsed once, when a rule is added (an invalid one is refused, saying where),
//! and bounded in length, nesting and clauses, so no expression can be costly to parse or to
//! evaluate.

use std::fmt;

use serde_json::Value;

/// Longest expression accepted, in bytes.
pub const MAX_LEN: usize = 4096;
/// Deepest nesting of parentheses.
pub const MAX_DEPTH: usize = 16;
/// Most clauses in one expression.
pub const MAX_CLAUSES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Glob,
    NotGlob,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Glob => "=~",
            Op::NotGlob => "!~",
        }
    }
}

/// A parsed expression. `And` and `Or` hold at least two operands and never an operand of
/// their own kind (the parser flattens `a && (b && c)`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Clause {
        claim: Vec<String>,
        op: Op,
        value: String,
    },
    And(Vec<Expr>),
    Or(Vec<Expr>),
}

/// Why an expression was refused, and at which byte.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("conditions: {message} at byte {at}")]
pub struct ParseError {
    pub at: usize,
    pub message: String,
}

pub fn parse(text: &str) -> Result<Expr, ParseError> {
    if text.len() > MAX_LEN {
        return Err(ParseError {
            at: MAX_LEN,
            message: format!("longer than {MAX_LEN} bytes"),
        });
    }
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err(ParseError {
            at: 0,
            message: "empty; a rule needs at least one clause, e.g. repository == \"org/app\""
                .into(),
        });
    }
    let mut parser = Parser {
        tokens,
        pos: 0,
        clauses: 0,
        end: text.len(),
    };
    let expr = parser.or(0)?;
    if let Some((at, t)) = parser.tokens.get(parser.pos) {
        return Err(ParseError {
            at: *at,
            message: format!("unexpected {t} after a complete expression"),
        });
    }
    Ok(expr)
}

impl Expr {
    /// Whether `claims` (a JWT's payload) satisfy the expression.
    pub fn eval(&self, claims: &Value) -> bool {
        match self {
            Expr::Clause { claim, op, value } => {
                let Some(actual) = lookup(claims, claim) else {
                    return false;
                };
                match op {
                    Op::Eq => actual == value,
                    Op::Ne => actual != value,
                    Op::Glob => glob_match(value, actual),
                    Op::NotGlob => !glob_match(value, actual),
                }
            }
            Expr::And(all) => all.iter().all(|e| e.eval(claims)),
            Expr::Or(any) => any.iter().any(|e| e.eval(claims)),
        }
    }

    /// The claim names the expression looks at, dotted, each once.
    pub fn claims(&self) -> Vec<String> {
        let mut out = Vec::new();
        self.collect_claims(&mut out);
        out
    }

    fn collect_claims(&self, out: &mut Vec<String>) {
        match self {
            Expr::Clause { claim, .. } => {
                let name = claim.join(".");
                if !out.contains(&name) {
                    out.push(name);
                }
            }
            Expr::And(v) | Expr::Or(v) => v.iter().for_each(|e| e.collect_claims(out)),
        }
    }
}

/// A string claim at `path`; `None` if missing or not a string.
fn lookup<'a>(claims: &'a Value, path: &[String]) -> Option<&'a str> {
    let mut at = claims;
    for segment in path {
        at = at.as_object()?.get(segment)?;
    }
    at.as_str()
}

/// `*` matches any run of characters, `/` included; `?` exactly one character; everything else
/// itself. Linear backtracking (the last `*` only), so no pattern is exponential.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it currently stands for.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl fmt::Display for Expr {
    /// The canonical form: parses back to the same expression.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Clause { claim, op, value } => {
                for (i, segment) in claim.iter().enumerate() {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    if is_name(segment) {
                        f.write_str(segment)?;
                    } else {
                        write_quoted(f, segment)?;
                    }
                }
                write!(f, " {} ", op.as_str())?;
                write_quoted(f, value)
            }
            Expr::And(all) => {
                for (i, e) in all.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" && ")?;
                    }
                    if matches!(e, Expr::Or(_)) {
                        write!(f, "({e})")?;
                    } else {
                        write!(f, "{e}")?;
                    }
                }
                Ok(())
            }
            Expr::Or(any) => {
                for (i, e) in any.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" || ")?;
                    }
                    write!(f, "{e}")?;
                }
                Ok(())
            }
        }
    }
}

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("\"")?;
    for c in s.chars() {
        if c == '"' || c == '\\' {
            f.write_str("\\")?;
        }
        write!(f, "{c}")?;
    }
    f.write_str("\"")
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

fn is_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_name_char)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Name(String),
    Str(String),
    Dot,
    Op(Op),
    And,
    Or,
    Open,
    Close,
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Name(n) => write!(f, "name {n:?}"),
            Token::Str(s) => write!(f, "string {s:?}"),
            Token::Dot => f.write_str("'.'"),
            Token::Op(op) => write!(f, "'{}'", op.as_str()),
            Token::And => f.write_str("'&&'"),
            Token::Or => f.write_str("'||'"),
            Token::Open => f.write_str("'('"),
            Token::Close => f.write_str("')'"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<(usize, Token)>, ParseError> {
    let mut out = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        let two = |chars: &mut std::iter::Peekable<std::str::CharIndices<'_>>, second: char| {
            if chars.peek().map(|&(_, c)| c) == Some(second) {
                chars.next();
                true
            } else {
                false
            }
        };
        let token = match c {
            c if c.is_whitespace() => continue,
            '(' => Token::Open,
            ')' => Token::Close,
            '.' => Token::Dot,
            '=' if two(&mut chars, '=') => Token::Op(Op::Eq),
            '=' if two(&mut chars, '~') => Token::Op(Op::Glob),
            '!' if two(&mut chars, '=') => Token::Op(Op::Ne),
            '!' if two(&mut chars, '~') => Token::Op(Op::NotGlob),
            '&' if two(&mut chars, '&') => Token::And,
            '|' if two(&mut chars, '|') => Token::Or,
            '"' => {
                let mut s = String::new();
                loop {
                    match chars.next() {
                        None => {
                            return Err(ParseError {
                                at,
                                message: "unterminated string".into(),
                            });
                        }
                        Some((_, '"')) => break,
                        Some((esc, '\\')) => match chars.next() {
                            Some((_, c @ ('"' | '\\'))) => s.push(c),
                            _ => {
                                return Err(ParseError {
                                    at: esc,
                                    message: "only \\\" and \\\\ are escapes".into(),
                                });
                            }
                        },
                        Some((_, c)) => s.push(c),
                    }
                }
                Token::Str(s)
            }
            c if is_name_char(c) => {
                let mut name = String::from(c);
                while let Some(&(_, c)) = chars.peek() {
                    if !is_name_char(c) {
                        break;
                    }
                    name.push(c);
                    chars.next();
                }
                Token::Name(name)
            }
            other => {
                return Err(ParseError {
                    at,
                    message: format!(
                        "unexpected {other:?}; expected a claim, a string, ==, !=, =~, !~, &&, \
                         ||, ( or )"
                    ),
                });
            }
        };
        out.push((at, token));
    }
    Ok(out)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    pos: usize,
    clauses: usize,
    /// The text's length, where "unexpected end" points.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.pos).map(|(_, t)| t)
    }

    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.end, |(at, _)| *at)
    }

    fn error(&self, expected: &str) -> ParseError {
        let found = match self.tokens.get(self.pos) {
            Some((_, t)) => t.to_string(),
            None => "the end".to_string(),
        };
        ParseError {
            at: self.at(),
            message: format!("expected {expected}, found {found}"),
        }
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut any = vec![self.and(depth)?];
        while self.peek() == Some(&Token::Or) {
            self.pos += 1;
            any.push(self.and(depth)?);
        }
        Ok(join(any, Expr::Or))
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut all = vec![self.primary(depth)?];
        while self.peek() == Some(&Token::And) {
            self.pos += 1;
            all.push(self.primary(depth)?);
        }
        Ok(join(all, Expr::And))
    }

    fn primary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        if self.peek() == Some(&Token::Open) {
            if depth >= MAX_DEPTH {
                return Err(ParseError {
                    at: self.at(),
                    message: format!("nested deeper than {MAX_DEPTH} parentheses"),
                });
            }
            self.pos += 1;
            let inner = self.or(depth + 1)?;
            if self.peek() != Some(&Token::Close) {
                return Err(self.error("')'"));
            }
            self.pos += 1;
            return Ok(inner);
        }
        self.clause()
    }

    fn clause(&mut self) -> Result<Expr, ParseError> {
        let start = self.at();
        let mut claim = Vec::new();
        loop {
            match self.peek() {
                Some(Token::Name(n) | Token::Str(n)) if !n.is_empty() => {
                    claim.push(n.clone());
                    self.pos += 1;
                }
                _ => return Err(self.error("a claim name")),
            }
            if self.peek() != Some(&Token::Dot) {
                break;
            }
            self.pos += 1;
        }
        let op = match self.peek() {
            Some(Token::Op(op)) => *op,
            _ => return Err(self.error("==, !=, =~ or !~")),
        };
        self.pos += 1;
        let value = match self.peek() {
            Some(Token::Str(s)) => s.clone(),
            _ => return Err(self.error("a quoted string")),
        };
        self.pos += 1;
        self.clauses += 1;
        if self.clauses > MAX_CLAUSES {
            return Err(ParseError {
                at: start,
                message: format!("more than {MAX_CLAUSES} clauses"),
            });
        }
        Ok(Expr::Clause { claim, op, value })
    }
}

/// One operand stays itself; several of the same kind are flattened into one list.
fn join(mut operands: Vec<Expr>, make: fn(Vec<Expr>) -> Expr) -> Expr {
    if operands.len() == 1 {
        return operands.remove(0);
    }
    let mut flat = Vec::with_capacity(operands.len());
    for e in operands {
        match (make(Vec::new()), e) {
            (Expr::And(_), Expr::And(inner)) | (Expr::Or(_), Expr::Or(inner)) => flat.extend(inner),
            (_, e) => flat.push(e),
        }
    }
    make(flat)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // a failed unwrap in a test is the failure
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn github() -> Value {
        json!({
            "iss": "https://token.actions.githubusercontent.com",
            "sub": "repo:org/app:ref:refs/heads/main",
            "repository": "org/app",
            "repository_owner": "org",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "run_attempt": 1,
            "protected": true,
            "kubernetes.io": {"namespace": "ci", "serviceaccount": {"name": "builder"}},
            "list": ["a"],
        })
    }

    #[test]
    fn expressions_evaluate_on_string_claims() {
        let cases: &[(&str, bool)] = &[
            (r#"repository == "org/app""#, true),
            (r#"repository == "org/other""#, false),
            (r#"repository != "org/other""#, true),
            (
                r#"repository == "org/app" && ref == "refs/heads/main""#,
                true,
            ),
            (
                r#"repository == "org/app" && ref == "refs/heads/dev""#,
                false,
            ),
            (r#"repository == "x" || ref == "refs/heads/main""#, true),
            (r#"ref =~ "refs/heads/*""#, true),
            (r#"ref =~ "refs/tags/v*""#, false),
            (r#"ref !~ "refs/tags/*""#, true),
            (r#"ref =~ "refs/heads/mai?""#, true),
            (r#"ref =~ "*/main""#, true),
            (r#"ref =~ "refs/*/ma*n""#, true),
            (r#"ref =~ "refs""#, false),
            // Missing and non-string claims are false, whatever the operator.
            (r#"environment == "prod""#, false),
            (r#"environment != "prod""#, false),
            (r#"environment !~ "*""#, false),
            (r#"run_attempt == "1""#, false),
            (r#"run_attempt != "2""#, false),
            (r#"protected == "true""#, false),
            (r#"list != "x""#, false),
            (r#""kubernetes.io" != "x""#, false),
            // Nested claims.
            (r#""kubernetes.io".namespace == "ci""#, true),
            (r#""kubernetes.io".serviceaccount.name == "builder""#, true),
            (
                r#""kubernetes.io".serviceaccount.name.x == "builder""#,
                false,
            ),
            (r#"repository.name == "org/app""#, false),
            // Precedence: && binds tighter than ||.
            (
                r#"ref == "x" && ref == "y" || repository == "org/app""#,
                true,
            ),
            (
                r#"ref == "x" && (ref == "y" || repository == "org/app")"#,
                false,
            ),
            (
                r#"(repository == "org/app") && ((ref =~ "refs/tags/v*") || (ref == "refs/heads/main"))"#,
                true,
            ),
        ];
        for (text, want) in cases {
            let expr = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(expr.eval(&github()), *want, "{text}");
            // The canonical form parses back to the same expression.
            assert_eq!(parse(&expr.to_string()).unwrap(), expr, "{text} -> {expr}");
        }
    }

    #[test]
    fn invalid_expressions_say_what_and_where() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "empty"),
            ("   ", 0, "empty"),
            ("repository", 10, "expected ==, !=, =~ or !~, found the end"),
            ("repository ==", 13, "expected a quoted string"),
            (
                "repository == org",
                14,
                "expected a quoted string, found name",
            ),
            (r#"repository = "x""#, 11, "unexpected '='"),
            (r#"repository == "x"#, 14, "unterminated string"),
            (r#"repository == "x\n""#, 16, "escapes"),
            (r#"repository == "x" &&"#, 20, "expected a claim name"),
            (r#"repository == "x" & ref == "y""#, 18, "unexpected '&'"),
            (r#"(repository == "x""#, 18, "expected ')'"),
            (r#"repository == "x")"#, 17, "unexpected ')'"),
            (r#"repository == "x" ref == "y""#, 18, "unexpected name"),
            (r#"a. == "x""#, 3, "expected a claim name"),
            (r#""" == "x""#, 0, "expected a claim name"),
            (r#"== "x""#, 0, "expected a claim name"),
            (r#""x" == "y" == "z""#, 11, "unexpected '=='"),
            ("repository == 'x'", 14, "unexpected '\\''"),
        ];
        for (text, at, message) in cases {
            match parse(text) {
                Ok(e) => panic!("{text:?} parsed as {e:?}"),
                Err(e) => {
                    assert!(e.message.contains(message), "{text:?}: {e}");
                    assert_eq!(e.at, *at, "{text:?}: {e}");
                }
            }
        }
    }

    #[test]
    fn expressions_are_bounded() {
        let deep = format!("{}a == \"b\"{}", "(".repeat(17), ")".repeat(17));
        assert!(parse(&deep).unwrap_err().message.contains("nested deeper"));
        let ok = format!("{}a == \"b\"{}", "(".repeat(16), ")".repeat(16));
        assert!(parse(&ok).is_ok());
        let many = vec!["a == \"b\""; MAX_CLAUSES + 1].join(" || ");
        assert!(parse(&many).unwrap_err().message.contains("clauses"));
        let long = format!("a == \"{}\"", "x".repeat(MAX_LEN));
        assert!(parse(&long).unwrap_err().message.contains("longer"));
    }

    #[test]
    fn globs() {
        let cases = [
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("*", "anything/at/all", true),
            ("a*", "a", true),
            ("a*b", "ab", true),
            ("a*b", "axxb", true),
            ("a*b", "axxbc", false),
            ("a*b*c", "abbbc", true),
            ("a*b*c", "acb", false),
            ("?", "é", true),
            ("??", "é", false),
            ("refs/tags/v*", "refs/tags/v1.2.3", true),
            ("refs/tags/v*", "refs/tags/1.2.3", false),
            ("*a*a*a*a*a*b", &"a".repeat(2000), false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p:?} ~ {t:?}");
        }
    }

    #[test]
    fn claims_lists_each_claim_once() {
        let e = parse(r#"repository == "a" && (ref == "b" || ref =~ "c") && x.y != "d""#).unwrap();
        assert_eq!(e.claims(), vec!["repository", "ref", "x.y"]);
    }

    fn arb_expr() -> impl Strategy<Value = Expr> {
        let segment = prop_oneof!["[a-z_]{1,8}", "[a-z.:/ \"\\\\é]{1,6}"];
        let clause = (
            prop::collection::vec(segment, 1..3),
            prop_oneof![
                Just(Op::Eq),
                Just(Op::Ne),
                Just(Op::Glob),
                Just(Op::NotGlob)
            ],
            "[a-z/*?\"\\\\ ]{0,8}",
        )
            .prop_map(|(claim, op, value)| Expr::Clause { claim, op, value });
        clause.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 2..4).prop_map(|v| join(v, Expr::And)),
                prop::collection::vec(inner, 2..4).prop_map(|v| join(v, Expr::Or)),
            ]
        })
    }

    fn arb_claims() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            "[a-z/*?]{0,6}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<bool>().prop_map(Value::from),
            Just(Value::Null),
        ];
        leaf.prop_recursive(3, 32, 4, |inner| {
            prop::collection::btree_map("[a-z_]{1,3}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect()))
        })
    }

    proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in "\\PC{0,200}") {
            if let Ok(e) = parse(&text) {
                e.eval(&github());
            }
        }

        #[test]
        fn text_made_of_the_languages_tokens_never_panics(
            parts in prop::collection::vec(
                prop_oneof![
                    Just("("), Just(")"), Just("&&"), Just("||"), Just("=="), Just("!="),
                    Just("=~"), Just("!~"), Just("."), Just("a"), Just("\"x\""), Just("\""),
                    Just("\\"), Just(" "), Just("!"), Just("="), Just("&"),
                ],
                0..60,
            )
        ) {
            let text = parts.concat();
            if let Ok(e) = parse(&text) {
                prop_assert_eq!(parse(&e.to_string()), Ok(e));
            }
        }

        #[test]
        fn the_canonical_form_round_trips_and_evaluates_alike(
            expr in arb_expr(),
            claims in arb_claims(),
        ) {
            let text = expr.to_string();
            let parsed = parse(&text).map_err(|e| TestCaseError::fail(format!("{text}: {e}")))?;
            prop_assert_eq!(&parsed, &expr);
            prop_assert_eq!(parsed.eval(&claims), expr.eval(&claims));
        }

        #[test]
        fn globs_never_panic(p in "[a*?/é]{0,12}", t in "[a/é]{0,24}") {
            let star_free = !p.contains('*') && !p.contains('?');
            if star_free {
                prop_assert_eq!(glob_match(&p, &t), p == t);
            }
            prop_assert!(glob_match("*", &t));
        }
    }
}
