"""A small MCP server for the tests (written with the maintained `mcp` package): a travel desk
whose tools carry long, realistic documentation (the tool-docs case study prompts with it),
plus tools that fail and hang on purpose, and an HTTP server that is no MCP server at all.

    python bench/agentic/mcp_server.py            # stdio
    python bench/agentic/mcp_server.py --http N   # streamable HTTP on 127.0.0.1:N/mcp
    python bench/agentic/mcp_server.py --http N --delay 0.5   # tools as slow as remote APIs

Standalone (only `mcp` and the standard library): the stdio form runs as its own process.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Annotated

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

CITIES = {
    "paris": {"country": "France", "population": 2_102_650, "timezone": "Europe/Paris"},
    "tokyo": {"country": "Japan", "population": 14_094_034, "timezone": "Asia/Tokyo"},
    "lima": {"country": "Peru", "population": 10_092_000, "timezone": "America/Lima"},
}
RATES = {"USD": 1.0, "EUR": 0.92, "JPY": 151.0, "PEN": 3.75}  # units per US dollar


def build_server(delay: float = 0.0) -> MCPServer:
    """The desk; each travel tool answers after `delay` seconds, as a remote API would."""
    desk = MCPServer("travel-desk", log_level="WARNING")

    @desk.tool()
    async def add(
        a: Annotated[float, Field(description="The first addend, any finite number.")],
        b: Annotated[float, Field(description="The second addend, any finite number.")],
    ) -> float:
        """Adds two numbers and returns their sum as a floating-point number.

        Use this calculator for any arithmetic the answer depends on (totals of fares,
        nights times a nightly rate, sums of distances) instead of computing in your head: the
        result is exact to double precision. Both arguments are required. The tool never
        rounds; format the number yourself when you quote it to the traveller.
        """
        await anyio.sleep(delay)
        return a + b

    @desk.tool()
    async def lookup_city(
        city: Annotated[str, Field(description="A city name, case-insensitive, e.g. 'Paris'.")],
    ) -> dict[str, object]:
        """Looks up reference facts about a city: its country, its population as of the last
        census, and its IANA time zone.

        Call it before planning anything that depends on where a city is or what time it is
        there (meeting times, the local day of an arrival). The lookup covers the cities the
        travel desk serves; an unknown city is an error that names the city, and you should
        ask the traveller to check its spelling rather than guess. Facts are static reference
        data, safe to cache for the whole conversation; they never change within a session.
        """
        await anyio.sleep(delay)
        facts = CITIES.get(city.strip().lower())
        if facts is None:
            raise ToolError(f"no city named {city!r} in the travel desk's records")
        return {"city": city.strip().title(), **facts}

    @desk.tool()
    async def weather_forecast(
        city: Annotated[str, Field(description="The city to forecast, as for lookup_city.")],
        days: Annotated[int, Field(description="Days ahead, 1 to 7; 1 is tomorrow.")] = 1,
    ) -> str:
        """Returns the weather forecast for a city: the sky, the high and low temperature in
        degrees Celsius, and the chance of rain, for each of the next `days` days.

        Forecasts past three days are uncertain; say so when you rely on them. Temperatures
        are for the city centre; airports and hills may differ by a few degrees. The answer is
        plain text, one line per day, in the form `day N: sky, high/low C, rain P%`. Ask for
        the fewest days the plan needs: each extra day lengthens the reply you must read.
        """
        await anyio.sleep(delay)
        seed = sum(map(ord, city.lower()))
        lines = []
        for d in range(1, max(1, min(days, 7)) + 1):
            high = 12 + (seed + 3 * d) % 15
            sky = ("sunny", "cloudy", "showers")[(seed + d) % 3]
            lines.append(f"day {d}: {sky}, {high}/{high - 8} C, rain {(seed * d) % 90}%")
        return "\n".join(lines)

    @desk.tool()
    async def convert_currency(
        amount: Annotated[float, Field(description="The sum to convert, in `source` units.")],
        source: Annotated[str, Field(description="ISO 4217 code of the amount: USD, EUR...")],
        target: Annotated[str, Field(description="ISO 4217 code to convert into.")],
    ) -> float:
        """Converts an amount of money between currencies at the desk's daily reference rates
        (USD, EUR, JPY and PEN are supported).

        Rates are mid-market rates fixed once a day; card payments and cash exchanges cost
        more, typically one to three percent, which this tool does not add. The result is not
        rounded: round to the currency's minor unit (cents; whole yen) when you quote it. An
        unsupported code is an error listing the supported ones.
        """
        await anyio.sleep(delay)
        if source not in RATES or target not in RATES:
            raise ToolError(f"supported currencies: {', '.join(RATES)}")
        return amount / RATES[source] * RATES[target]

    @desk.tool()
    async def search_flights(
        origin: Annotated[str, Field(description="IATA code of the departure airport, 'CDG'.")],
        destination: Annotated[str, Field(description="IATA code of the arrival airport.")],
        date: Annotated[str, Field(description="Departure date, YYYY-MM-DD.")],
        max_stops: Annotated[int, Field(description="At most this many stops; 0: direct.")] = 1,
    ) -> str:
        """Searches scheduled flights between two airports on one date and returns up to three
        offers, cheapest first: the flight number, departure and arrival times (local), the
        number of stops and the fare in US dollars for one adult in economy.

        Airports are IATA codes, not city names: look the city's airport up first if the
        traveller named a city. Fares change by the minute; an offer is not a booking and holds
        no seat. Prefer direct flights when the difference is small. A date in the past, or an
        unknown airport, is an error that says which argument is wrong.
        """
        await anyio.sleep(delay)
        if len(origin) != 3 or len(destination) != 3:
            raise ToolError("origin and destination are three-letter IATA codes")
        base = sum(map(ord, origin + destination + date)) % 400 + 180
        return "\n".join(
            f"PF{100 + i * 7}: {origin} 0{7 + i}:15 -> {destination} {13 + i}:40, "
            f"{min(i, max_stops)} stops, {base + 45 * i} USD"
            for i in range(3)
        )

    @desk.tool()
    async def book_table(
        restaurant: Annotated[str, Field(description="The restaurant's name as listed.")],
        time: Annotated[str, Field(description="Local time of the booking, HH:MM, 24-hour.")],
        people: Annotated[int, Field(description="Guests, 1 to 12.")] = 2,
    ) -> str:
        """Books a table at a restaurant for tonight and returns the confirmation code.

        Bookings are binding: only call this once the traveller has agreed to the restaurant
        and the time. Tables are held for fifteen minutes past the booked time. Groups larger
        than twelve must call the restaurant directly; the tool refuses them. Cancelling is not
        possible through the desk.
        """
        await anyio.sleep(delay)
        if not 1 <= people <= 12:
            raise ToolError("a booking is for 1 to 12 people")
        code = sum(map(ord, restaurant + time)) % 9000 + 1000
        return f"booked {restaurant} at {time} for {people}: code {code}"

    @desk.tool()
    def fail(reason: str) -> str:
        """Always fails with `reason` (for tests of failing tools)."""
        raise ToolError(reason)

    @desk.tool()
    async def hang(seconds: float) -> str:
        """Sleeps `seconds` before answering (for tests of slow tools)."""
        await anyio.sleep(seconds)
        return "woke"

    return desk


class HttpMcpServer:
    """The desk over streamable HTTP on a loopback port, served by uvicorn on a thread."""

    def __init__(self) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/mcp"
        app = build_server().streamable_http_app()
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> HttpMcpServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


class BrokenServer(ThreadingHTTPServer):
    """Not an MCP server: `/500` answers 500, `/garbage` bytes that are no HTTP, `/hang`
    nothing for a long while."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Broken)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"


class _Broken(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        if self.path == "/garbage":
            self.wfile.write(b"\x00\x01 this is not a status line\r\n\r\n")
        elif self.path == "/hang":
            time.sleep(5)
        else:
            self.send_response(500)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"boom")

    do_GET = do_POST

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--http", type=int, default=None, help="serve on this loopback port")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds each travel tool takes")
    options = parser.parse_args()
    desk = build_server(options.delay)
    if options.http is None:
        desk.run("stdio")
    else:
        desk.run("streamable-http", host="127.0.0.1", port=options.http)
