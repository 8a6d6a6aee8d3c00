"""The server's public port serves Flower's Fleet API only (what SuperNodes use), in front of a SuperLink that
listens on the loopback.

Flower 1.42 serves its Fleet API (SuperNodes), its Control API (``flwr run``/``stop``/``ls``, SuperNode key
registration) and its Runtime API on one HTTP port, and without an account-auth plugin (Flower's OIDC plugin is not
in the open-source distribution) it accepts every Control API caller. Anyone who reaches that port, e.g. a site,
which holds the CA certificate, could start its own app bundle (run at the server and at every site), register
SuperNode keys or stop the run. ``fednnunet_server`` therefore binds the SuperLink to 127.0.0.1 and puts this
proxy on the public address: it forwards requests under ``/v1/fleet/`` (with their SuperNode-authentication
headers, which the SuperLink checks) and answers everything else with 403; the control connection of
``fednnunet_server`` itself goes to the loopback.

    python -m fednnunet.fleet_proxy --listen HOST:PORT --target https://127.0.0.1:PORT2 [--ca-file ca.crt]
                                    [--certfile server.pem --keyfile server.key]
"""
import argparse
import sys
from typing import Optional

#: every path a SuperNode uses (flwr/supernode/fleet_http_client.py)
FLEET_PREFIX = '/v1/fleet/'
#: headers that belong to one connection, not to the request or response carried
_HOP_BY_HOP = frozenset({'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization', 'te', 'trailers',
                         'transfer-encoding', 'upgrade', 'host', 'content-length'})


def create_app(target: str, ca_file: Optional[str] = None, client=None, log=None):
    """The proxy as an ASGI app. ``client``: an httpx.AsyncClient to the SuperLink (default: one for ``target``,
    verifying its certificate with ``ca_file``)."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    upstream = client or httpx.AsyncClient(base_url=target, verify=ca_file if ca_file else True, timeout=None)
    say = log or (lambda text: print(f'[fednnunet fleet proxy] {text}', file=sys.stderr, flush=True))

    async def forward(request):
        path = request.url.path
        if not path.startswith(FLEET_PREFIX) or '/../' in path:
            say(f'refused {request.method} {path} from {request.client.host if request.client else "?"}: only the '
                f'Fleet API is served on this port')
            return JSONResponse({'detail': 'fednnunet: only the Fleet API (SuperNodes) is served on this port; '
                                           "the server's control connection is on its own machine"},
                                status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        url = path + (f'?{request.url.query}' if request.url.query else '')
        reply = await upstream.request(request.method, url, content=await request.body(), headers=headers)
        return Response(reply.content, status_code=reply.status_code,
                        headers={k: v for k, v in reply.headers.items()
                                 if k.lower() not in _HOP_BY_HOP | {'content-encoding'}})

    methods = ['GET', 'POST', 'PUT', 'PATCH', 'DELETE', 'HEAD', 'OPTIONS']
    return Starlette(routes=[Route('/{path:path}', forward, methods=methods), Route('/', forward, methods=methods)])


def main(argv=None):
    p = argparse.ArgumentParser(prog='python -m fednnunet.fleet_proxy', description=__doc__.split('\n')[0])
    p.add_argument('--listen', required=True, metavar='HOST:PORT')
    p.add_argument('--target', required=True, metavar='URL', help='the SuperLink, e.g. https://127.0.0.1:9099')
    p.add_argument('--ca-file', default=None, help="CA certificate that signed the SuperLink's certificate")
    p.add_argument('--certfile', default=None, help='TLS certificate of the public port')
    p.add_argument('--keyfile', default=None, help='its private key')
    args = p.parse_args(argv)
    import uvicorn
    host, port = args.listen.rsplit(':', 1)
    uvicorn.run(create_app(args.target, args.ca_file), host=host, port=int(port), ssl_certfile=args.certfile,
                ssl_keyfile=args.keyfile, log_level='warning')


if __name__ == '__main__':
    main()
