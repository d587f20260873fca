"""A minimal asyncio TCP redirector (the "write it in Python" baseline).

    python asyncio_proxy.py LISTEN_ADDR LISTEN_PORT BACKEND_ADDR BACKEND_PORT

Runs only inside a lab namespace, started and killed by the benchmark.
"""
import asyncio
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def main(addr, port, baddr, bport):
    async def handle(reader, writer):
        try:
            breader, bwriter = await asyncio.open_connection(baddr, bport)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, bwriter), pipe(breader, writer))

    server = await asyncio.start_server(handle, addr, port, backlog=4096, reuse_address=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
