import asyncio

async def evaluate(i):
    await asyncio.sleep(0)
    return i * i

async def main():
    return await asyncio.gather(*(evaluate(i) for i in range(8)))

print(asyncio.run(main()))
