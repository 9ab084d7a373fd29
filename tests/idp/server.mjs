// A real OpenID Provider for tokenbroker's integration tests: the certified `oidc-provider`
// package, configured per profile, with scripted (non-interactive) login and consent by default,
// or oidc-provider's own login and consent pages for tests that drive a real browser.
//
// Prints exactly one line `LISTENING http://127.0.0.1:<port>` on stdout when ready.
//
// Environment:
//   PROFILE       oidc (default) | google-like | microsoft-like
//   ACCESS_TTL    access-token lifetime in seconds (default 5)
//   REDIRECT_URI  the test client's redirect URI (default http://127.0.0.1:9/callback)
//   REQUIRE_PAR   1 (oidc profile): the provider requires pushed authorization requests
//                 (RFC 9126) of every client (`require_pushed_authorization_requests: true` in
//                 discovery). PAR is on in the oidc profile (oidc-provider's default) and off
//                 in the google-like and microsoft-like ones, as at Google and Microsoft; `iss`
//                 on authorization responses (RFC 9207) is on in all of them.
//   INTERACTIONS  scripted (default): the `login_hint` user (else `alice`) is signed in and
//                 consent granted without any page.
//                 pages: oidc-provider's built-in development pages (devInteractions). The
//                 login page (GET /interaction/<uid>) is a form with `input[name=login]`,
//                 `input[name=password]` and a `button.login-submit` "Sign-in"; any login and
//                 any non-empty password are accepted and the login is the account id. The
//                 consent page is a form with `input[name=prompt][value=consent]` and a
//                 `button.login-submit` "Continue". Consent is skipped when the grant already
//                 covers the request.
//
// Clients: `tb-basic` (client_secret_basic) and `tb-post` (client_secret_post), both with the
// secret `tb-secret~+/=` (characters that trip up Basic auth encoders); `tb-secretjwt`
// (client_secret_jwt, secret JWT_SECRET below); `tb-pkjwt` (private_key_jwt) when CLIENT_JWKS
// holds a public JWK Set (JSON) that the test generated at run time. `tb-par` (oidc profile
// only) is `tb-basic` with client metadata `require_pushed_authorization_requests: true`.
//
// Test-only endpoints (under /__test/):
//   POST /__test/revoke-user?user=NAME   revokes every grant of NAME (next refresh: invalid_grant)
//   GET  /__test/counters                JSON counters, see `counters` below
import http from 'node:http';
import Provider from 'oidc-provider';

const PROFILE = process.env.PROFILE || 'oidc';
const ACCESS_TTL = Number(process.env.ACCESS_TTL || 5);
const REDIRECT_URI = process.env.REDIRECT_URI || 'http://127.0.0.1:9/callback';
const INTERACTIONS = process.env.INTERACTIONS || 'scripted';
const SECRET = 'tb-secret~+/=';

if (!['scripted', 'pages'].includes(INTERACTIONS)) {
  console.error(`unknown INTERACTIONS ${INTERACTIONS}`);
  process.exit(2);
}

if (!['oidc', 'google-like', 'microsoft-like'].includes(PROFILE)) {
  console.error(`unknown PROFILE ${PROFILE}`);
  process.exit(2);
}

const counters = {
  refresh_requests: 0,      // refresh_token grants handled (successes + errors)
  refresh_successes: 0,
  refresh_errors: 0,
  reuse_detected: 0,        // a consumed refresh token presented again (the grant is then revoked)
  code_exchanges: 0,
  revocation_requests: 0,   // POST /token/revocation answered 200
  grants_revoked: 0,
};

// What each grant was asked for at authorization time, by grant id.
const grantInfo = new Map();
// Users who already received a refresh token, per client (Google gives one only on first consent).
const hadRefreshToken = new Set();
const grantsByUser = new Map();

// Remembers what a consented grant was asked for (see `grantInfo`) and whose it is (for
// /__test/revoke-user); both interaction modes call it.
function recordGrant(grantId, params, accountId) {
  const requested = String(params.scope || '').split(' ');
  grantInfo.set(grantId, {
    accessTypeOffline: params.access_type === 'offline',
    promptConsent: String(params.prompt || '').split(' ').includes('consent'),
    requestedOffline: requested.includes('offline_access'),
  });
  if (!grantsByUser.has(accountId)) grantsByUser.set(accountId, new Set());
  grantsByUser.get(accountId).add(grantId);
}

async function issueRefreshToken(ctx, client, code) {
  if (!client.grantTypeAllowed('refresh_token')) return false;
  const info = grantInfo.get(code.grantId) || {};
  if (PROFILE === 'google-like') {
    // Google: only with access_type=offline, and only on first consent or with prompt=consent.
    const key = `${code.accountId}|${client.clientId}`;
    const ok = info.accessTypeOffline && (info.promptConsent || !hadRefreshToken.has(key));
    // A later login on the same grant may skip the consent interaction, which is where
    // `promptConsent` is recorded: spend it here so that it covers one code only.
    info.promptConsent = false;
    if (ok) hadRefreshToken.add(key);
    return ok;
  }
  if (PROFILE === 'microsoft-like') {
    return info.requestedOffline === true;
  }
  return code.scopes.has('offline_access');
}

const configuration = {
  clients: ['basic', 'post'].map((style) => ({
    client_id: `tb-${style}`,
    client_secret: SECRET,
    redirect_uris: [REDIRECT_URI],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    token_endpoint_auth_method: style === 'basic' ? 'client_secret_basic' : 'client_secret_post',
  })),
  pkce: { required: () => true },
  scopes: ['openid', 'offline_access', 'email', 'profile'],
  claims: { openid: ['sub'], email: ['email', 'email_verified'] },
  extraParams: ['access_type', 'include_granted_scopes'],
  features: {
    // The built-in pages serve GET/POST /interaction/:uid themselves (and set interactions.url).
    devInteractions: { enabled: INTERACTIONS === 'pages' },
    revocation: { enabled: true },
    introspection: { enabled: true },
  },
  ttl: {
    AccessToken: ACCESS_TTL,
    AuthorizationCode: 60,
    IdToken: 3600,
    RefreshToken: 14 * 24 * 3600,
    Grant: 14 * 24 * 3600,
    Session: 14 * 24 * 3600,
    Interaction: 600,
  },
  // Strict profiles rotate on every refresh; a consumed token presented again revokes the grant.
  rotateRefreshToken: PROFILE !== 'google-like',
  issueRefreshToken,
  ...(INTERACTIONS === 'scripted'
    ? { interactions: { url: (ctx, interaction) => `/interaction/${interaction.uid}` } }
    : {}),
  findAccount: async (ctx, id) => ({
    accountId: id,
    claims: async () => ({ sub: id, email: `${id}@example.test`, email_verified: true }),
  }),
  cookies: { keys: ['tokenbroker-test-cookie-key'] },
};

// Clients authenticating with a signed assertion (RFC 7523), appended to the two above.
const JWT_SECRET = 'tb-secretjwt-secret~+/=-0123456789abcdefghijklmnopqrstuvwxyz';
const assertionClient = (id, method, extra) => ({
  client_id: id,
  redirect_uris: [REDIRECT_URI],
  grant_types: ['authorization_code', 'refresh_token'],
  response_types: ['code'],
  token_endpoint_auth_method: method,
  ...extra,
});
configuration.clients.push(
  assertionClient('tb-secretjwt', 'client_secret_jwt', { client_secret: JWT_SECRET }),
);
if (process.env.CLIENT_JWKS) {
  configuration.clients.push(
    assertionClient('tb-pkjwt', 'private_key_jwt', { jwks: JSON.parse(process.env.CLIENT_JWKS) }),
  );
}

// RFC 9126. Google and Microsoft advertise no PAR endpoint: their profiles turn it off, so
// their logins keep sending parameters in the URL (which the microsoft-like hack above reads).
// The oidc profile has a client that must push its authorization requests, and optionally
// requires them of every client.
if (PROFILE === 'oidc') {
  configuration.clients.push({
    ...configuration.clients.find((c) => c.client_id === 'tb-basic'),
    client_id: 'tb-par',
    require_pushed_authorization_requests: true,
  });
  configuration.features.pushedAuthorizationRequests = {
    enabled: true,
    requirePushedAuthorizationRequests: process.env.REQUIRE_PAR === '1',
  };
} else {
  configuration.features.pushedAuthorizationRequests = { enabled: false };
}

const server = http.createServer();
server.keepAliveTimeout = 60_000;
server.listen(0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `http://127.0.0.1:${port}`;
  const provider = new Provider(issuer, configuration);

  provider.on('grant.success', (ctx) => {
    if (ctx.oidc.params.grant_type === 'refresh_token') counters.refresh_successes += 1;
    if (ctx.oidc.params.grant_type === 'authorization_code') counters.code_exchanges += 1;
  });
  provider.on('grant.error', (ctx, err) => {
    if (ctx.oidc.params?.grant_type !== 'refresh_token') return;
    counters.refresh_errors += 1;
    if (err.error_detail === 'refresh token already used') counters.reuse_detected += 1;
  });
  provider.on('grant.revoked', () => { counters.grants_revoked += 1; });
  provider.on('server_error', (ctx, err) => { console.error('server_error', err); });
  if (process.env.DEBUG_EVENTS) {
    provider.on('grant.error', (ctx, err) => console.error('grant.error', err.error, err.error_detail));
  }

  provider.use(async (ctx, next) => {
    // Test control.
    if (ctx.path === '/__test/counters') {
      counters.refresh_requests = counters.refresh_successes + counters.refresh_errors;
      ctx.body = counters;
      return;
    }
    if (ctx.path === '/__test/revoke-user' && ctx.method === 'POST') {
      const user = ctx.query.user;
      for (const grantId of grantsByUser.get(user) || []) {
        await Promise.all([
          provider.AccessToken.revokeByGrantId(grantId),
          provider.RefreshToken.revokeByGrantId(grantId),
          provider.AuthorizationCode.revokeByGrantId(grantId),
          provider.Grant.adapter.destroy(grantId),
        ]);
      }
      ctx.body = { revoked: (grantsByUser.get(user) || new Set()).size };
      return;
    }
    const m = ctx.path.match(/^\/interaction\/([^/]+)$/);
    // Built-in pages: after the consent form is submitted, record the grant it saved, as the
    // scripted consent below does.
    if (INTERACTIONS === 'pages' && m && ctx.method === 'POST') {
      await next();
      const interaction = await provider.Interaction.find(m[1]);
      const grantId = interaction?.result?.consent?.grantId;
      if (grantId && interaction.session?.accountId) {
        recordGrant(grantId, interaction.params, interaction.session.accountId);
      }
      return;
    }
    // Scripted interactions: log in the `login_hint` user and grant what was asked.
    if (INTERACTIONS === 'scripted' && m && ctx.method === 'GET') {
      const details = await provider.interactionDetails(ctx.req, ctx.res);
      const { prompt, params, session } = details;
      let result;
      if (prompt.name === 'login') {
        result = { login: { accountId: params.login_hint || 'alice' } };
      } else if (prompt.name === 'consent') {
        const grant = details.grantId
          ? await provider.Grant.find(details.grantId)
          : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
        const d = prompt.details;
        if (d.missingOIDCScope) grant.addOIDCScope(d.missingOIDCScope.join(' '));
        if (d.missingOIDCClaims) grant.addOIDCClaims(d.missingOIDCClaims);
        if (d.missingResourceScopes) {
          for (const [indicator, scopes] of Object.entries(d.missingResourceScopes)) {
            grant.addResourceScope(indicator, scopes.join(' '));
          }
        }
        const grantId = await grant.save();
        recordGrant(grantId, params, session.accountId);
        result = { consent: { grantId } };
      } else {
        ctx.status = 500;
        ctx.body = `unexpected prompt ${prompt.name}`;
        return;
      }
      const to = await provider.interactionResult(ctx.req, ctx.res, result, { mergeWithLastSubmission: true });
      ctx.redirect(to);
      return;
    }

    // Microsoft honours `offline_access` without prompt=consent; oidc-provider follows OIDC Core
    // §11 and drops it. Ask for consent on the client's behalf (as Microsoft shows its consent
    // page on first use anyway).
    if (PROFILE === 'microsoft-like' && ctx.path === '/auth' && ctx.method === 'GET') {
      const scope = String(ctx.query.scope || '').split(' ');
      if (scope.includes('offline_access') && !ctx.query.prompt) {
        ctx.query = { ...ctx.query, prompt: 'consent' };
      }
    }

    const isToken = ctx.path === '/token' && ctx.method === 'POST';
    const isRevocation = ctx.path === '/token/revocation' && ctx.method === 'POST';
    await next();
    if (isRevocation && ctx.status === 200) counters.revocation_requests += 1;
    if (isToken && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
      if (PROFILE === 'google-like' && ctx.oidc?.params?.grant_type === 'refresh_token') {
        delete ctx.body.refresh_token; // Google never returns one on refresh
      }
      if (PROFILE === 'microsoft-like') {
        ctx.body.ext_expires_in = ctx.body.expires_in; // Entra's extended lifetime field
      }
    }
  });

  server.on('request', provider.callback());
  process.stdout.write(`LISTENING ${issuer}\n`);
});

process.on('SIGTERM', () => process.exit(0));
