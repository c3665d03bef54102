"""A built-in gazetteer of real cities: where synthetic chips are placed on the globe.

Each entry gives the city centre (WGS84), its country, the terrain settings that occur around
it (which decides which scene kinds may be drawn there: harbours only near coasts, rivers
only where a river runs, hills near mountains) and a Koppen-style climate group used by the
knowledge text. Coordinates are rounded to 0.01 degree.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class City:
  name: str
  country: str
  lon: float
  lat: float
  terrain: tuple[str, ...]  # subset of TERRAINS
  climate: str  # one of CLIMATES


TERRAINS = ("coastal", "river", "mountain", "plain", "desert")
CLIMATES = ("tropical", "arid", "temperate", "continental", "polar")

_T = {"c": "coastal", "r": "river", "m": "mountain", "p": "plain", "d": "desert"}
_CL = {"tr": "tropical", "ar": "arid", "te": "temperate", "co": "continental", "po": "polar"}

# name, country, lon, lat, terrain letters, climate code
_ROWS = """
Shanghai|China|121.47|31.23|crp|te
Beijing|China|116.40|39.90|pm|co
Guangzhou|China|113.26|23.13|rp|te
Shenzhen|China|114.06|22.54|cm|te
Tianjin|China|117.20|39.13|cp|co
Wuhan|China|114.31|30.59|rp|te
Chongqing|China|106.55|29.56|rm|te
Nanjing|China|118.80|32.06|rp|te
Qingdao|China|120.38|36.07|cm|te
Dalian|China|121.61|38.91|cm|co
Xiamen|China|118.09|24.48|cm|te
Harbin|China|126.53|45.80|rp|co
Lanzhou|China|103.83|36.06|rmd|ar
Urumqi|China|87.62|43.83|md|ar
Lhasa|China|91.17|29.65|rm|co
Sanya|China|109.51|18.25|cm|tr
Hong Kong|China|114.17|22.32|cm|te
Taipei|China|121.56|25.03|rm|te
Tokyo|Japan|139.69|35.69|cp|te
Osaka|Japan|135.50|34.69|crp|te
Sapporo|Japan|141.35|43.06|cm|co
Fukuoka|Japan|130.40|33.59|cp|te
Seoul|South Korea|126.98|37.57|rm|co
Busan|South Korea|129.08|35.18|cm|te
Pyongyang|North Korea|125.76|39.04|rp|co
Vladivostok|Russia|131.89|43.12|cm|co
Manila|Philippines|120.98|14.60|cp|tr
Ho Chi Minh City|Vietnam|106.63|10.82|rp|tr
Hanoi|Vietnam|105.85|21.03|rp|te
Bangkok|Thailand|100.50|13.76|rp|tr
Singapore|Singapore|103.82|1.35|cp|tr
Kuala Lumpur|Malaysia|101.69|3.14|rm|tr
Jakarta|Indonesia|106.85|-6.21|cp|tr
Surabaya|Indonesia|112.75|-7.25|cp|tr
Yangon|Myanmar|96.20|16.84|rp|tr
Dhaka|Bangladesh|90.41|23.81|rp|tr
Kolkata|India|88.36|22.57|rp|tr
Mumbai|India|72.88|19.08|cp|tr
Chennai|India|80.27|13.08|cp|tr
New Delhi|India|77.21|28.61|rp|ar
Karachi|Pakistan|67.01|24.86|cd|ar
Lahore|Pakistan|74.36|31.52|rp|ar
Kabul|Afghanistan|69.21|34.56|md|ar
Tehran|Iran|51.39|35.69|md|ar
Dubai|United Arab Emirates|55.27|25.20|cd|ar
Doha|Qatar|51.53|25.29|cd|ar
Riyadh|Saudi Arabia|46.68|24.71|pd|ar
Jeddah|Saudi Arabia|39.19|21.49|cd|ar
Baghdad|Iraq|44.36|33.31|rpd|ar
Istanbul|Turkey|28.98|41.01|cm|te
Ankara|Turkey|32.85|39.93|md|co
Tel Aviv|Israel|34.78|32.09|cp|te
Cairo|Egypt|31.24|30.04|rd|ar
Alexandria|Egypt|29.92|31.20|cd|ar
Casablanca|Morocco|-7.59|33.57|cp|ar
Algiers|Algeria|3.06|36.75|cm|te
Tunis|Tunisia|10.18|36.81|cp|te
Lagos|Nigeria|3.38|6.52|cp|tr
Accra|Ghana|-0.19|5.60|cp|tr
Dakar|Senegal|-17.47|14.72|cp|ar
Kinshasa|DR Congo|15.27|-4.44|rp|tr
Nairobi|Kenya|36.82|-1.29|mp|tr
Mombasa|Kenya|39.67|-4.04|cp|tr
Addis Ababa|Ethiopia|38.76|9.03|mp|te
Khartoum|Sudan|32.56|15.50|rd|ar
Dar es Salaam|Tanzania|39.21|-6.79|cp|tr
Luanda|Angola|13.23|-8.84|cp|ar
Johannesburg|South Africa|28.05|-26.20|pm|te
Cape Town|South Africa|18.42|-33.92|cm|te
Antananarivo|Madagascar|47.52|-18.88|mp|te
London|United Kingdom|-0.13|51.51|rp|te
Liverpool|United Kingdom|-2.98|53.41|crp|te
Paris|France|2.35|48.86|rp|te
Marseille|France|5.37|43.30|cm|te
Amsterdam|Netherlands|4.90|52.37|cp|te
Rotterdam|Netherlands|4.48|51.92|crp|te
Hamburg|Germany|9.99|53.55|rp|te
Berlin|Germany|13.40|52.52|rp|te
Munich|Germany|11.58|48.14|mp|te
Zurich|Switzerland|8.54|47.38|mr|te
Vienna|Austria|16.37|48.21|rp|te
Prague|Czechia|14.44|50.08|rp|te
Warsaw|Poland|21.01|52.23|rp|co
Copenhagen|Denmark|12.57|55.68|cp|te
Oslo|Norway|10.75|59.91|cm|co
Stockholm|Sweden|18.07|59.33|cp|co
Helsinki|Finland|24.94|60.17|cp|co
Reykjavik|Iceland|-21.94|64.15|cm|po
Dublin|Ireland|-6.26|53.35|cp|te
Lisbon|Portugal|-9.14|38.72|crp|te
Madrid|Spain|-3.70|40.42|pm|te
Barcelona|Spain|2.17|41.39|cm|te
Rome|Italy|12.50|41.90|rp|te
Naples|Italy|14.27|40.85|cm|te
Venice|Italy|12.32|45.44|cp|te
Athens|Greece|23.73|37.98|cm|te
Bucharest|Romania|26.10|44.43|rp|co
Kyiv|Ukraine|30.52|50.45|rp|co
Odesa|Ukraine|30.72|46.48|cp|co
Moscow|Russia|37.62|55.76|rp|co
Saint Petersburg|Russia|30.34|59.93|crp|co
Murmansk|Russia|33.08|68.97|cm|po
Novosibirsk|Russia|82.92|55.03|rp|co
New York|United States|-74.01|40.71|crp|te
Boston|United States|-71.06|42.36|cp|co
Washington|United States|-77.04|38.91|rp|te
Miami|United States|-80.19|25.76|cp|tr
Houston|United States|-95.37|29.76|cp|te
New Orleans|United States|-90.07|29.95|crp|te
Chicago|United States|-87.63|41.88|cp|co
Denver|United States|-104.99|39.74|mp|ar
Phoenix|United States|-112.07|33.45|pd|ar
Las Vegas|United States|-115.14|36.17|md|ar
Los Angeles|United States|-118.24|34.05|cm|te
San Francisco|United States|-122.42|37.77|cm|te
Seattle|United States|-122.33|47.61|cm|te
Anchorage|United States|-149.90|61.22|cm|po
Honolulu|United States|-157.86|21.31|cm|tr
Vancouver|Canada|-123.12|49.28|cm|te
Toronto|Canada|-79.38|43.65|cp|co
Montreal|Canada|-73.57|45.50|rp|co
Mexico City|Mexico|-99.13|19.43|md|te
Veracruz|Mexico|-96.13|19.17|cp|tr
Havana|Cuba|-82.37|23.11|cp|tr
Panama City|Panama|-79.52|8.98|cp|tr
Bogota|Colombia|-74.07|4.71|mp|te
Lima|Peru|-77.04|-12.05|cd|ar
Quito|Ecuador|-78.47|-0.18|mp|te
Manaus|Brazil|-60.02|-3.12|rp|tr
Rio de Janeiro|Brazil|-43.17|-22.91|cm|tr
Sao Paulo|Brazil|-46.63|-23.55|mp|te
Buenos Aires|Argentina|-58.38|-34.60|crp|te
Santiago|Chile|-70.67|-33.45|md|te
Valparaiso|Chile|-71.63|-33.05|cm|te
Montevideo|Uruguay|-56.16|-34.90|cp|te
Sydney|Australia|151.21|-33.87|cp|te
Melbourne|Australia|144.96|-37.81|cp|te
Perth|Australia|115.86|-31.95|crp|te
Darwin|Australia|130.84|-12.46|cp|tr
Alice Springs|Australia|133.88|-23.70|md|ar
Auckland|New Zealand|174.76|-36.85|cm|te
Wellington|New Zealand|174.78|-41.29|cm|te
"""


def _parse(rows: str) -> tuple[City, ...]:
  cities = []
  for line in rows.strip().splitlines():
    name, country, lon, lat, terrain, climate = line.split("|")
    cities.append(City(name, country, float(lon), float(lat),
                       tuple(_T[t] for t in terrain), _CL[climate]))
  return tuple(cities)


CITIES: tuple[City, ...] = _parse(_ROWS)
