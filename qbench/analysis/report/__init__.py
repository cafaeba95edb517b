"""What people read (parent process): DataFrame -> Markdown / HTML / CSV / Parquet tables and plots."""
