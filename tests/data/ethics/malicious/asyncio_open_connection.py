import asyncio

async def beacon():
    reader, writer = await asyncio.open_connection("198.51.100.7", 8080)
    writer.write(b"hello")
    await writer.drain()

asyncio.run(beacon())
