"""`doctor`'s checks for the API route (`upload.transport = "api"`): the key file, TLS to base_url,
and that the key is accepted, by one harmless authenticated read (the status of a job that cannot
exist). Nothing is uploaded and no job is created."""

from __future__ import annotations

from collections.abc import Callable

from agent.config import ApiConfig
from agent.transport.api import (
    ApiError,
    ApiKeyError,
    ApiKeyRefused,
    ImportApi,
    api_key_path,
    load_api_key,
    tls_details,
)


class ApiCheckFailed(Exception):
    def __init__(self, detail: str, fix: str) -> None:
        super().__init__(detail)
        self.detail = detail
        self.fix = fix


class ApiChecks:
    def __init__(self, cfg: ApiConfig) -> None:
        self.cfg = cfg
        self._key: str | None = None

    def plan(self) -> list[tuple[str, Callable[[], str], tuple[str, ...]]]:
        return [
            ("API key file", self.check_key_file, ()),
            ("TLS", self.check_tls, ()),
            ("API key accepted", self.check_key_accepted, ("API key file", "TLS")),
        ]

    def check_key_file(self) -> str:
        try:
            path = api_key_path(self.cfg)
            self._key = load_api_key(path)
        except ApiKeyError as exc:
            raise ApiCheckFailed(str(exc), "put the tenant API key alone in the file named by"
                                 " api.api_key_file (chmod 600, owned by the service user), or pass it with"
                                 " LoadCredential=api-key:PATH") from None
        source = "systemd credential api-key" if path != self.cfg.api_key_file else "api.api_key_file"
        return f"{path} ({source}): one key of {len(self._key)} characters, not readable by group or others"

    def check_tls(self) -> str:
        if self.cfg.base_url.startswith("http://"):
            return (f"{self.cfg.base_url} is plain HTTP to a loopback address (only for tests; nothing"
                    " leaves this machine)")
        try:
            details = tls_details(self.cfg)
        except ApiError as exc:
            raise ApiCheckFailed(str(exc), "check api.base_url and that this machine reaches it on port 443"
                                 " (HTTPS_PROXY is honoured); for a private CA or a TLS-inspecting proxy set"
                                 " api.ca_file to its CA certificate (PEM)") from None
        trust = f"api.ca_file {self.cfg.ca_file}" if self.cfg.ca_file else "the system's CAs"
        return f"{self.cfg.base_url}: {details}; trusted by {trust}"

    def check_key_accepted(self) -> str:
        assert self._key is not None
        api = ImportApi(self.cfg, self._key, connections=1)
        try:
            said = api.check_key()
        except ApiKeyRefused as exc:
            raise ApiCheckFailed(str(exc), "copy the key from the SaaSquatch portal (Settings > API Keys) of"
                                 f" tenant {self.cfg.tenant_alias} (live and test tenants have their own"
                                 " keys) and check api.tenant_alias") from None
        except ApiError as exc:
            raise ApiCheckFailed(str(exc), "check api.base_url and api.tenant_alias; try again later if"
                                 " SaaSquatch is unavailable") from None
        finally:
            api.close()
        return (f"SaaSquatch accepts the key for tenant {self.cfg.tenant_alias} (a harmless read, the status"
                f" of a job that does not exist: {said}); nothing was uploaded or created")
