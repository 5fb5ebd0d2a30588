import asyncio

async def main():
    proc = await asyncio.create_subprocess_shell("cat /etc/passwd")
    await proc.wait()

asyncio.run(main())
