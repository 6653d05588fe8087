"""End-to-end walk against the real `tollgate` binary, as a new user would take it.

A local SMTP sink (aiosmtpd) receives the emails; tokens are read out of them. The
access token is verified offline with PyJWT against the published JWKS, and TOTP
codes are computed with pyotp, and Stripe webhooks are signed with Python's hmac: none
of Tollgate's own code checks Tollgate here.

Usage: walk.py BINARY [DATABASE_URL]   (default: SQLite in a temporary data dir)
"""

import email
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import jwt
import pyotp
import requests
from aiosmtpd.controller import Controller

PASSWORD = "correct horse battery staple"
WEBHOOK_SECRET = "whsec_e2e_walk"
PLANS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "plans", "credits-api.toml")


def stripe_signed(payload, secret=WEBHOOK_SECRET, t=None):
    """Headers of a delivery signed the way Stripe signs: HMAC-SHA256 over "t.payload"."""
    t = int(time.time()) if t is None else t
    signature = hmac.new(secret.encode(), f"{t}.{payload}".encode(), hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={t},v1={signature}", "Content-Type": "application/json"}


def credits_walk(base, key):
    """Credits bought through a signed Stripe event (delivered twice), spent, refused."""
    svc = {"Authorization": f"Bearer {key}"}
    r = requests.post(f"{base}/v1/accounts", headers=svc, json={"external_id": "e2e-buyer"})
    check(r.status_code == 201, "a customer account for credits")
    account = r.json()["id"]
    session = {
        "id": "cs_test_e2e", "object": "checkout.session", "mode": "payment", "payment_status": "paid",
        "status": "complete", "customer": "cus_e2e", "client_reference_id": account,
        "payment_intent": "pi_e2e", "amount_total": 1500, "currency": "usd",
        "metadata": {"account_id": account, "credit_package": "starter", "credits": "100"},
    }
    event = {"id": "evt_e2e_1", "object": "event", "api_version": "2026-09-30.endive", "created": int(time.time()),
             "type": "checkout.session.completed", "data": {"object": session}, "livemode": False}
    payload = json.dumps(event)
    hook = f"{base}/v1/billing/webhooks/stripe"
    r = requests.post(hook, data=payload, headers=stripe_signed(payload))
    check(r.status_code == 200 and r.json()["outcome"] == "applied", "a signed checkout.session.completed is applied")
    r = requests.post(hook, data=payload, headers=stripe_signed(payload))
    check(r.status_code == 200 and r.json()["outcome"] == "duplicate", "the same event again is a duplicate")
    r = requests.post(hook, data=payload, headers=stripe_signed(payload, secret="whsec_wrong"))
    check(r.status_code == 400, "a wrong signature is refused")
    r = requests.post(hook, data=payload, headers=stripe_signed(payload, t=int(time.time()) - 600))
    check(r.status_code == 400, "a stale signature is refused")
    r = requests.get(f"{base}/v1/accounts/{account}/credits", headers=svc)
    check(r.json()["balance"] == 100 and r.json()["purchased"] == 100, "100 credits bought, once")
    r = requests.post(f"{base}/v1/accounts/{account}/credits/spend", headers=svc, json={"amount": 5})
    check(r.status_code == 200 and r.json()["transaction"]["balance_after"] == 95, "spend 5")
    r = requests.post(f"{base}/v1/accounts/{account}/credits/spend", headers=svc, json={"amount": 96})
    check(r.status_code == 402 and r.json()["error"]["code"] == "insufficient_credits", "overspending is refused")
    r = requests.get(f"{base}/v1/accounts/{account}/credits/transactions", headers=svc)
    kinds = [t["kind"] for t in r.json()["transactions"]]
    check(kinds == ["usage", "purchase"], "the history shows the purchase and the spend")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sink:
    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content)
        parts = [msg] if not msg.is_multipart() else [p for p in msg.walk() if not p.is_multipart()]
        text = "\n".join(p.get_payload(decode=True).decode() for p in parts)
        self.messages.append((envelope.rcpt_tos, text))
        return "250 OK"

    def wait_for(self, to, n, timeout=15):
        deadline = time.time() + timeout
        while time.time() < deadline:
            mine = [text for rcpts, text in self.messages if to in rcpts]
            if len(mine) >= n:
                return mine[n - 1]
            time.sleep(0.05)
        raise AssertionError(f"no email #{n} to {to}: {self.messages}")


def token_in(text, path):
    m = re.search(rf"/{path}\?token=([A-Za-z0-9_-]+)", text)
    assert m, f"no {path} link in {text}"
    return m.group(1)


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print(f"  ok  {what}")


def main():
    binary = os.path.abspath(sys.argv[1])
    database_url = sys.argv[2] if len(sys.argv) > 2 else None
    sink = Sink()
    smtp = Controller(sink, hostname="127.0.0.1", port=free_port())
    smtp.start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="tollgate-e2e-")
    env = dict(
        os.environ,
        TOLLGATE_LISTEN=f"127.0.0.1:{port}",
        TOLLGATE_DATA_DIR=data,
        TOLLGATE_PUBLIC_URL=base,
        TOLLGATE_SMTP_URL=f"smtp://127.0.0.1:{smtp.port}",
        TOLLGATE_LOG="warn",
        TOLLGATE_PLANS_FILE=os.path.abspath(PLANS),
        TOLLGATE_STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET,
    )
    if database_url:
        env["TOLLGATE_DATABASE_URL"] = database_url
    print(f"walk on {database_url or 'SQLite'}")

    out = subprocess.run([binary, "migrate"], env=env, capture_output=True, text=True, check=True).stdout
    check("applied migrations" in out or "up to date" in out, f"tollgate migrate: {out.strip()}")
    out = subprocess.run([binary, "migrate"], env=env, capture_output=True, text=True, check=True).stdout
    check("up to date" in out, "a second migrate does nothing")

    out = subprocess.run([binary, "keys", "create", "--name", "e2e", "--scopes", "accounts:write,credits:read,credits:write"],
                         env=env, capture_output=True, text=True, check=True).stdout
    service_key = out.strip().splitlines()[-1]
    check(service_key.startswith("tg_sk_"), "keys create prints the secret once")

    server = subprocess.Popen([binary, "serve"], env=env, cwd=data)
    try:
        for _ in range(100):
            try:
                if requests.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.1)
        else:
            raise AssertionError("server never became ready")
        credits_walk(base, service_key)
        key_file = os.path.join(data, "signing-keys.json")
        check(os.stat(key_file).st_mode & 0o777 == 0o600, "signing keys stored with 0600")

        who = "e2e@example.com"
        r = requests.post(f"{base}/v1/auth/register", json={"email": who.upper(), "password": PASSWORD, "locale": "fr"})
        check(r.status_code == 201 and r.json()["user"]["email"] == who, "register (email normalised)")
        mail = sink.wait_for(who, 1)
        check("Bienvenue" in mail, "French verification email arrived over SMTP")
        r = requests.post(f"{base}/v1/auth/login", json={"email": who, "password": PASSWORD})
        check(r.status_code == 403 and r.json()["error"]["code"] == "email_not_verified", "unverified login refused")
        r = requests.post(f"{base}/v1/auth/verify-email", json={"token": token_in(mail, "verify-email")})
        check(r.status_code == 200 and r.json()["user"]["email_verified"], "email verified from the link")

        r = requests.post(f"{base}/v1/auth/login", json={"email": who, "password": PASSWORD})
        check(r.status_code == 200, "login")
        access = r.json()["access_token"]
        jwks = jwt.PyJWKSet.from_dict(requests.get(f"{base}/.well-known/jwks.json").json())
        kid = jwt.get_unverified_header(access)["kid"]
        key = next(k for k in jwks.keys if k.key_id == kid)
        claims = jwt.decode(access, key=key, algorithms=["EdDSA"], issuer=base, options={"require": ["exp", "iat", "sub"]})
        check(claims["sub"] == r.json()["user"]["id"] and {"sid", "acc", "role", "jti"} <= claims.keys(),
              "access token verified offline with PyJWT against the JWKS")
        bad = jwt.encode(dict(claims), "not-the-key", algorithm="HS256", headers={"kid": kid})
        check(requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {bad}"}).status_code == 401,
              "HS256-forged token refused")

        auth = {"Authorization": f"Bearer {access}"}
        setup = requests.post(f"{base}/v1/me/2fa/setup", headers=auth).json()
        totp = pyotp.TOTP(setup["secret"])
        check(setup["otpauth_uri"].startswith("otpauth://totp/") and "<svg" in setup["qr_svg"], "2FA setup with QR SVG")
        r = requests.post(f"{base}/v1/me/2fa/enable", headers=auth, json={"password": PASSWORD, "code": totp.now()})
        check(r.status_code == 200 and len(r.json()["recovery_codes"]) == 10, "2FA enabled with 10 recovery codes")
        r = requests.post(f"{base}/v1/auth/login", json={"email": who, "password": PASSWORD}).json()
        check(r["mfa_required"] and "access_token" not in r, "password alone now asks for the second factor")
        code = totp.at(time.time() + 30)
        r = requests.post(f"{base}/v1/auth/login/mfa", json={"mfa_token": r["mfa_token"], "code": code})
        check(r.status_code == 200, "login with a TOTP code")
        mfa_access, first_refresh = r.json()["access_token"], r.json()["refresh_token"]
        again = requests.post(f"{base}/v1/auth/login", json={"email": who, "password": PASSWORD}).json()
        r = requests.post(f"{base}/v1/auth/login/mfa", json={"mfa_token": again["mfa_token"], "code": code})
        check(r.status_code == 401 and r.json()["error"]["code"] == "invalid_mfa_code", "the same TOTP code is refused")

        r = requests.post(f"{base}/v1/auth/refresh", json={"refresh_token": first_refresh})
        check(r.status_code == 200 and r.json()["refresh_token"] != first_refresh, "refresh rotates")
        new_access = r.json()["access_token"]
        r = requests.post(f"{base}/v1/auth/refresh", json={"refresh_token": first_refresh})
        check(r.status_code == 401 and r.json()["error"]["code"] == "refresh_token_reused", "replayed refresh token")
        for t in (mfa_access, new_access):
            check(requests.get(f"{base}/v1/me", headers={"Authorization": f"Bearer {t}"}).status_code == 401,
                  "the replay killed the session at once")

        requests.post(f"{base}/v1/auth/password/forgot", json={"email": who})
        reset = token_in(sink.wait_for(who, 2), "reset-password")
        r = requests.post(f"{base}/v1/auth/password/reset", json={"token": reset, "password": "a whole new passphrase"})
        check(r.status_code == 200, "password reset from the emailed link")
        r = requests.post(f"{base}/v1/auth/password/reset", json={"token": reset, "password": "and another one again"})
        check(r.status_code == 400, "the reset link works once")
        check(requests.get(f"{base}/v1/me", headers=auth).status_code == 401, "reset ended every session")
        r = requests.post(f"{base}/v1/auth/login", json={"email": who, "password": "a whole new passphrase"})
        check(r.status_code == 200 and r.json()["mfa_required"], "login with the new password (2FA kept)")

        out = subprocess.run([binary, "admin", "create", "--email", "root@example.com"], env=env,
                             capture_output=True, text=True, check=True).stdout
        link = re.search(r"reset-password\?token=([A-Za-z0-9_-]+)", out)
        check(link is not None, "admin create prints a one-time link")
        r = requests.post(f"{base}/v1/auth/password/reset", json={"token": link.group(1), "password": "admin passphrase 1"})
        check(r.status_code == 200, "the link sets the admin's password")
        r = requests.post(f"{base}/v1/auth/login", json={"email": "root@example.com", "password": "admin passphrase 1"})
        role = jwt.decode(r.json()["access_token"], options={"verify_signature": False})["role"]
        check(role == "admin", "the admin signs in with role admin")
        admin_id = r.json()["user"]["id"]
        admin = {"Authorization": f"Bearer {r.json()['access_token']}"}
        r = requests.get(f"{base}/v1/admin/users", params={"q": "e2e@"}, headers=admin)
        if database_url:
            check(r.status_code == 403 and r.json()["error"]["code"] == "admin_2fa_required",
                  "outside the embedded dev setup an admin needs 2FA")
            setup = requests.post(f"{base}/v1/me/2fa/setup", headers=admin).json()
            r = requests.post(f"{base}/v1/me/2fa/enable", headers=admin,
                              json={"password": "admin passphrase 1", "code": pyotp.TOTP(setup["secret"]).now()})
            check(r.status_code == 200, "the admin turns 2FA on")
            r = requests.get(f"{base}/v1/admin/users", params={"q": "e2e@"}, headers=admin)
        check(r.status_code == 200 and r.json()["total"] == 1, "the admin finds the user")
        user_id = r.json()["users"][0]["id"]
        r = requests.post(f"{base}/v1/admin/users/{user_id}/impersonate", headers=admin)
        check(r.status_code == 200, "the admin impersonates the user")
        token = r.json()["access_token"]
        jwks = jwt.PyJWKSet.from_dict(requests.get(f"{base}/.well-known/jwks.json").json())
        key = next(k for k in jwks.keys if k.key_id == jwt.get_unverified_header(token)["kid"])
        claims = jwt.decode(token, key=key, algorithms=["EdDSA"], issuer=base)
        check(claims["sub"] == user_id and claims["act"] == {"sub": admin_id} and claims["exp"] - claims["iat"] <= 900,
              "the impersonation token's act claim (RFC 8693), verified offline with PyJWT")
        imp = {"Authorization": f"Bearer {token}"}
        check(requests.get(f"{base}/v1/me", headers=imp).json()["user"]["id"] == user_id, "it acts as the user")
        r = requests.get(f"{base}/v1/admin/users", headers=imp)
        check(r.status_code == 403 and r.json()["error"]["code"] == "impersonation_forbidden", "it is never an admin")
        r = requests.patch(f"{base}/v1/admin/users/{user_id}", headers=admin, json={"status": "suspended"})
        check(r.status_code == 200 and r.json()["user"]["status"] == "suspended", "the admin suspends the user")
        check(requests.get(f"{base}/v1/me", headers=imp).status_code == 401, "suspension ends their tokens at once")
        r = requests.get(f"{base}/v1/admin/audit-log", headers=admin,
                         params={"target": f"user:{user_id}", "action": "admin.user.suspended"})
        events = r.json()["events"]
        check(len(events) == 1 and events[0]["actor"] == {"type": "user", "id": admin_id},
              "the suspension is audited once, naming the admin")
    finally:
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=30)
        smtp.stop()
        shutil.rmtree(data, ignore_errors=True)
    check(code == 0, "SIGTERM: graceful shutdown, exit 0")
    print("walk passed")


if __name__ == "__main__":
    main()
