"""The standard-library client against the demo: fetch, invalidate, watch,
refusals, and no token in any repr or str."""

from __future__ import annotations

import threading

import pytest

from ktb_client import Broker, BrokerError, Token


def test_fetch_invalidate_and_watch(demo):
    broker = Broker(demo.api, account=demo.account, credential=demo.credential)
    token = broker.fetch(min_ttl=10)
    assert isinstance(token, Token) and token.token and token.account == demo.account
    assert token.ws_url == demo.ws_url
    assert token.token not in repr(token) and token.token not in str(token)

    events = broker.watch()
    first = next(events)
    assert isinstance(first, Token) and first.token == token.token

    # A report from another thread: the stream carries the replacement.
    replaced: list[Token] = []
    t = threading.Thread(target=lambda: replaced.append(broker.invalidate(token)))
    t.start()
    second = next(events)
    t.join()
    assert isinstance(second, Token) and second.token == replaced[0].token != token.token
    events.close()


def test_refusals_are_typed_and_never_echo_the_credential(demo):
    wrong = "ktb_not-a-real-credential-000000000000000000000"
    broker = Broker(demo.api, account=demo.account, credential=wrong)
    with pytest.raises(BrokerError) as e:
        broker.fetch()
    assert e.value.status == 401 and e.value.permanent
    assert wrong not in str(e.value)
    with pytest.raises(BrokerError) as e:
        next(broker.watch())
    assert e.value.status == 401

    other = Broker(demo.api, account="not-granted", credential=demo.credential)
    with pytest.raises(BrokerError) as e:
        other.fetch()
    assert e.value.status == 403
    with pytest.raises(BrokerError) as e:
        Broker(demo.api, account=demo.account, credential=demo.credential).fetch(min_ttl=100000)
    assert e.value.status == 400 and not e.value.permanent

    unreachable = Broker("http://127.0.0.1:1", credential=demo.credential, timeout=2)
    with pytest.raises(BrokerError) as e:
        unreachable.fetch()
    assert e.value.status == 0


def test_an_identity_is_required_and_urls_are_checked(monkeypatch):
    monkeypatch.delenv("KTB_CONSUMER_CREDENTIAL", raising=False)
    with pytest.raises(ValueError, match="give an identity"):
        Broker("http://127.0.0.1:8080")
    with pytest.raises(ValueError):
        Broker("ftp://x", credential="c")


def test_a_token_file_is_reread_on_every_request(demo, tmp_path):
    path = tmp_path / "token"
    path.write_text("ktb_wrong-at-first-000000000000000000000000\n")
    broker = Broker(demo.api, account=demo.account, token_file=str(path))
    with pytest.raises(BrokerError):
        broker.fetch()
    path.write_text(demo.credential + "\n")  # as the kubelet rewrites it
    assert broker.fetch().token
